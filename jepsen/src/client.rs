//! What every workload's clients share: a connection to one plane that is made again
//! after a failure, the run's clock and deadline, and how a failed request is recorded.

use std::time::{Duration, Instant};

use anyhow::Context;

use capstan_client::Credentials;
use etcd_client::Client;

use crate::history::{Clock, Op, Outcome, Process, Record};

/// A client's request timeout: past it, a write's outcome is unknown.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits after a failed request, rather than flood a dead plane.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Whether a request failed before it reached any plane (the connection was refused), so
/// it certainly did not happen. Anything else (a timeout, a reset) may have happened.
fn never_sent(error: &etcd_client::Error) -> bool {
    error.to_string().contains("tcp connect error")
}

/// The clock, deadline and pacing the clients of a run share.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub clock: Clock,
    pub deadline: Instant,
    /// Each client's pause between operations (zero: as fast as it goes).
    pub pause: Duration,
}

impl Run {
    pub fn going(&self) -> bool {
        Instant::now() < self.deadline
    }

    pub async fn pace(&self) {
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
    }
}

/// Where the planes are, and how to reach them (over TLS, with `--tls`).
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    pub urls: Vec<String>,
    pub credentials: Credentials,
}

impl Endpoints {
    /// The endpoint of one plane.
    pub fn one(&self, index: usize) -> Endpoints {
        Endpoints { urls: vec![self.urls[index].clone()], credentials: self.credentials.clone() }
    }

    /// A client on these endpoints whose requests give up after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, etcd_client::Error> {
        let options = self
            .credentials
            .connect_options(timeout)
            .map_err(|error| etcd_client::Error::InvalidArgs(format!("unusable client credentials: {error}")))?;
        Client::connect(&self.urls, Some(options)).await
    }
}

/// One client's connection to its plane, and the records of what it did.
pub struct Session {
    pub process: usize,
    endpoint: Endpoints,
    client: Option<Client>,
    /// A request failed: pause before the next connection.
    backoff: bool,
    pub history: Vec<Record>,
    pub run: Run,
}

impl Session {
    pub fn new(process: usize, endpoint: Endpoints, run: Run) -> Session {
        Session { process, endpoint, client: None, backoff: false, history: Vec::new(), run }
    }

    /// The connection, made anew (after a pause) when a request failed; None (after a
    /// pause) while the plane cannot be reached.
    pub async fn client(&mut self) -> Option<Client> {
        if std::mem::take(&mut self.backoff) {
            tokio::time::sleep(ERROR_PAUSE).await;
        }
        if self.client.is_none() {
            match self.endpoint.connect(REQUEST_TIMEOUT).await {
                Ok(client) => self.client = Some(client),
                Err(_) => {
                    tokio::time::sleep(ERROR_PAUSE).await;
                    return None;
                }
            }
        }
        // A Client is a handle on a shared channel: cloning it is cheap.
        self.client.clone()
    }

    /// Records an operation that began at `call` and ended now.
    pub fn record(&mut self, call: u64, outcome: Outcome, op: Op) {
        let ret = self.run.clock.now();
        self.history.push(Record { process: Process::Client(self.process), outcome, call, ret, op });
    }

    /// After a failed request: drop the connection (the plane may be dead or cut off; the
    /// next one waits a moment) and say whether the request certainly did not happen or
    /// may have.
    pub fn failed(&mut self, error: &etcd_client::Error) -> Outcome {
        self.client = None;
        self.backoff = true;
        if never_sent(error) {
            Outcome::Fail
        } else {
            Outcome::Info
        }
    }
}

/// A client on all the given endpoints for set-up and the reads after the heal, with a
/// long timeout.
pub async fn final_client(endpoints: &Endpoints) -> anyhow::Result<Client> {
    endpoints.connect(Duration::from_secs(10)).await.context("cannot connect to the cluster")
}

/// The revision after the store's current one: where histories read after the heal start.
pub async fn next_revision(endpoints: &Endpoints) -> anyhow::Result<i64> {
    let mut client = final_client(endpoints).await?;
    let response = client.get("jepsen/start", None).await.context("cannot read the current revision")?;
    Ok(response.header().map_or(0, |header| header.revision()) + 1)
}

/// How long a history read waits for its next message before it calls the stream stalled.
const HISTORY_STALL: Duration = Duration::from_secs(10);

/// Every event under `prefix` from revision `from` up to the store's current revision, in
/// order: the store's history, read back after the heal. The end is known from a progress
/// notification, so a last revision that touched no key under `prefix` is no wait.
pub async fn history(client: &mut Client, prefix: &str, from: i64) -> anyhow::Result<Vec<etcd_client::Event>> {
    let head = client.get(prefix, None).await.context("cannot read the current revision")?;
    let head = head.header().map_or(0, |header| header.revision());
    let options = etcd_client::WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = client.watch(prefix, Some(options)).await.with_context(|| format!("cannot watch {prefix}"))?;
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(HISTORY_STALL, stream.message()).await;
        let response = next
            .with_context(|| format!("the history of {prefix} stalled"))?
            .with_context(|| format!("the history of {prefix} failed"))?
            .with_context(|| format!("the history of {prefix} ended"))?;
        if response.canceled() {
            anyhow::bail!("the history of {prefix} was cancelled: {}", response.cancel_reason());
        }
        if response.events().is_empty() {
            // Created, or a progress notification: everything up to its revision is in.
            if !response.created() && response.header().map_or(0, |header| header.revision()) >= head {
                return Ok(events);
            }
            stream.request_progress().await.context("cannot ask the watch for its progress")?;
            continue;
        }
        for event in response.events() {
            match event.kv() {
                Some(kv) if kv.mod_revision() > head => return Ok(events),
                Some(_) => events.push(event.clone()),
                None => {}
            }
        }
        if events.last().and_then(|event| event.kv()).is_some_and(|kv| kv.mod_revision() == head) {
            return Ok(events);
        }
    }
}
