//! The dashboard's server side, on a real 3-plane cluster with its scheduler: the page and
//! its assets are served; every API endpoint the page uses answers with the cluster's
//! state (planes and leader, nodes with their allocation, pods filtered and paged on the
//! server, replica sets); unknown objects are 404s; the event stream reports changes as
//! they happen; and a plane that lost its quorum says so instead of serving stale rows.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use capstan_client::Objects;
use capstan_proto::objects::{Node, Object, Pod, NODE_LEASE_PREFIX};
use common::{http_get, leader_index, wait_for, Cluster};
use serde_json::Value;

fn json(address: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(address, path);
    (status, serde_json::from_str(&body).unwrap_or_else(|error| panic!("{path}: not JSON ({error}): {body}")))
}

/// The dashboard's event stream, line by line, from the first line after its headers
/// (so a change made once this returns is streamed).
fn event_stream(http: std::net::SocketAddr, headers: &[&str]) -> impl Iterator<Item = String> {
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(common::CONVERGE_TIMEOUT)).unwrap();
    let headers: String = headers.iter().map(|header| format!("{header}\r\n")).collect();
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: {http}\r\n{headers}Accept: text/event-stream\r\n\r\n").unwrap();
    let mut lines = BufReader::new(stream).lines().map_while(Result::ok);
    assert!(lines.next().unwrap().contains("200"), "the stream opens");
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
    }
    lines
}

/// The first line of an event stream that contains `needle`; a panic if none comes within
/// `CONVERGE_TIMEOUT` (the stream's keep-alives, every 15 s, keep its reads from timing out).
fn streamed(lines: &mut impl Iterator<Item = String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    lines
        .take_while(|_| std::time::Instant::now() < deadline)
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no change of {needle} was streamed"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_api_serves_the_cluster_and_follows_it() {
    let mut cluster = Cluster::start_with(3, &["--scheduler"]);
    let http = cluster.metrics[0];
    let client = capstan_client::connect(&cluster.endpoints(), Duration::from_secs(10)).await.unwrap();
    let objects = Objects::new(client);
    objects.create(&Object::Node(Node::ready("n1", "4", "8Gi", "110"))).await.unwrap();
    for name in ["web-1", "web-2", "db-1"] {
        let pod = Pod::requesting("default", name, &["sleep", "600"], "500m", "256Mi");
        objects.create(&Object::Pod(pod)).await.unwrap();
    }
    wait_for(&objects, "three pods bound to n1", |listed| {
        common::pods(listed).iter().filter(|pod| pod.spec.node_name == "n1").count() == 3
    })
    .await;

    // The page and its assets, compiled in.
    let (status, page) = http_get(http, "/");
    assert!(status == 200 && page.contains("/dashboard.js") && page.contains("Capstan"), "{status}: {page}");
    for asset in ["/dashboard.js", "/dashboard.css"] {
        let (status, body) = http_get(http, asset);
        assert!(status == 200 && body.len() > 500, "{asset}: {status}");
    }

    // Cluster: three planes, one leader, each reporting its status.
    let (status, view) = json(http, "/api/cluster");
    assert_eq!(status, 200, "{view}");
    let planes = view["planes"].as_array().unwrap();
    assert_eq!(planes.len(), 3, "{view}");
    assert_eq!(planes.iter().filter(|plane| plane["leader"] == true).count(), 1, "{view}");
    for plane in planes {
        assert!(plane["status"]["appliedIndex"].as_u64().unwrap() > 0, "{plane}");
    }

    // Nodes, with what their pods request against what they offer.
    let (status, nodes) = json(http, "/api/nodes");
    assert_eq!(status, 200, "{nodes}");
    let n1 = &nodes["items"][0];
    assert_eq!(n1["name"], "n1", "{nodes}");
    assert_eq!(n1["ready"], true, "{n1}");
    assert_eq!((n1["cpu"]["used"].as_i64(), n1["cpu"]["allocatable"].as_i64()), (Some(1500), Some(4000)), "{n1}");
    assert_eq!(n1["pods"]["used"], 3, "{n1}");
    assert!(n1["lease"].is_null(), "no agent holds n1's lease: {n1}");

    // Pods: filtered and paged on the server.
    let (_, web) = json(http, "/api/pods?q=web");
    assert_eq!(web["total"], 2, "{web}");
    let (_, page) = json(http, "/api/pods?limit=1&offset=1");
    assert_eq!((page["total"].as_u64(), page["items"].as_array().unwrap().len()), (Some(3), 1), "{page}");
    let (_, on_n1) = json(http, "/api/pods?node=n1");
    assert_eq!(on_n1["total"], 3, "{on_n1}");
    let (_, elsewhere) = json(http, "/api/pods?node=n2");
    assert_eq!(elsewhere["total"], 0, "{elsewhere}");
    let (status, detail) = json(http, "/api/pods/default/db-1");
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["summary"]["node"], "n1", "{detail}");
    // Its events, from its history: created, then scheduled to n1.
    let reasons: Vec<&str> = detail["events"].as_array().unwrap().iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons[..2], ["Created", "Scheduled"], "{detail}");
    assert!(detail["events"][1]["message"].as_str().unwrap().contains("to n1"), "{detail}");
    // n1 has no agent here, so no log endpoint: the detail says why there is no log.
    assert!(detail["logs"]["unavailable"].as_str().unwrap().contains("log endpoint"), "{detail}");
    let (status, node) = json(http, "/api/nodes/n1");
    assert!(status == 200 && node["pods"].as_array().unwrap().len() == 3, "{node}");
    let (status, _) = json(http, "/api/replicasets");
    assert_eq!(status, 200);

    // Unknown objects are a clear 404.
    let (status, missing) = json(http, "/api/pods/default/nope");
    assert!(status == 404 && missing["error"].as_str().unwrap().contains("default/nope"), "{missing}");
    let (status, missing) = json(http, "/api/nodes/nope");
    assert!(status == 404 && missing["error"].as_str().unwrap().contains("not found"), "{missing}");

    // The event stream reports a change as it happens.
    let mut lines = event_stream(http, &[]);
    let pod = Pod::requesting("default", "late", &["sleep", "600"], "100m", "64Mi");
    objects.create(&Object::Pod(pod)).await.unwrap();
    let change = streamed(&mut lines, "/registry/pods/default/late");
    assert!(change.contains("\"PUT\""), "{change}");
    // A node's lease key is a change the page follows too (the nodes view shows who holds
    // one), though it is not an object: an agent that takes its lease after its node was
    // last written would otherwise show "none" until something else changed.
    let mut writer = objects.client().clone();
    let lease = writer.lease_grant(60, None).await.unwrap().id();
    let options = etcd_client::PutOptions::new().with_lease(lease);
    writer.put(format!("{NODE_LEASE_PREFIX}n1"), "", Some(options)).await.unwrap();
    let change = streamed(&mut lines, "/registry/leases/nodes/n1");
    assert!(change.contains("\"Lease\""), "{change}");
    let (_, n1) = json(http, "/api/nodes/n1");
    assert_eq!(n1["summary"]["lease"]["ttl"], 60, "{n1}");

    // Without quorum a plane says so rather than serve what may be stale.
    let leader = leader_index(&cluster).await;
    let survivor = (leader + 1) % 3;
    for index in (0..3).filter(|index| *index != survivor) {
        cluster.planes[index].kill();
    }
    let (status, refused) = json(cluster.metrics[survivor], "/api/pods");
    assert_eq!(status, 503, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("no current data"), "{refused}");
    let (status, view) = json(cluster.metrics[survivor], "/api/cluster");
    assert_eq!(status, 200, "{view}");
    let unreachable =
        view["planes"].as_array().unwrap().iter().filter(|plane| plane["unreachable"].is_string()).count();
    assert_eq!(unreachable, 2, "the dead planes are shown unreachable: {view}");
}

const WEB: &str = "apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: c, command: [sh, -c, 'echo hello from web; sleep 600'], resources: {requests: {cpu: 100m}}}]
";

/// A headless Chromium, driven over WebDriver by chromedriver; both stop when dropped
/// (chromedriver runs in a process group of its own, which its Chromium shares, and the
/// whole group is killed), even when the test fails before it closes the session.
struct Browser {
    client: fantoccini::Client,
    driver: std::process::Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test started.
        unsafe { libc::killpg(self.driver.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let port = common::free_addr().port();
        let mut driver = std::process::Command::new("chromedriver");
        driver.arg(format!("--port={port}")).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let driver = std::os::unix::process::CommandExt::process_group(&mut driver, 0)
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup installs it)");
        let mut capabilities = serde_json::Map::new();
        let options = serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"],
        });
        capabilities.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let builder = fantoccini::ClientBuilder::new(connector.clone()).capabilities(capabilities.clone()).clone();
            match builder.connect(&format!("http://127.0.0.1:{port}")).await {
                Ok(client) => return Browser { client, driver },
                // chromedriver is still starting; nothing announces when it listens.
                Err(error) if std::time::Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("no WebDriver session: {error}"),
            }
        }
    }

    /// Waits until the page shows at least `count` elements matching `css`, as the page
    /// updates itself (the browser is never told to reload).
    async fn wait_for(&self, css: &str, count: usize) -> Vec<fantoccini::elements::Element> {
        let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
        loop {
            let found = self.client.find_all(fantoccini::Locator::Css(css)).await.expect("query the page");
            if found.len() >= count {
                return found;
            }
            if std::time::Instant::now() > deadline {
                let html = self.client.source().await.unwrap_or_default();
                let logs = output_dir().display().to_string();
                panic!("the page never showed {count} of {css} (cluster logs in {logs}); it shows:\n{html}");
            }
            // The DOM is only visible by asking for it.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// What `read` reads of the first element matching `css`, once there is one; looked up
    /// again if the page re-rendered it in between (a stale element).
    async fn read_first<T>(
        &self,
        css: &str,
        read: impl AsyncFn(&fantoccini::elements::Element) -> Result<T, fantoccini::error::CmdError>,
    ) -> T {
        loop {
            let found = self.wait_for(css, 1).await;
            match read(&found[0]).await {
                Ok(value) => return value,
                Err(error) if error.is_stale_element_reference() => continue,
                Err(error) => panic!("cannot read {css}: {error}"),
            }
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::write(output_dir().join(format!("{name}.png")), png).unwrap();
    }
}

/// Where the browser tests leave their screenshots and `capstan dev`'s log.
fn output_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The process id of `capstan agent --name <name>` whose data lives under `dir`.
fn agent_pid(name: &str, dir: &std::path::Path) -> libc::pid_t {
    let wanted = format!("agent --name {name} ");
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let pid = entry.file_name().to_str()?.parse().ok()?;
            (cmdline.contains(&wanted) && cmdline.contains(&dir)).then_some(pid)
        })
        .next()
        .unwrap_or_else(|| panic!("no agent {name} running"))
}

/// The dashboard of a `capstan dev` cluster in real headless Chromium: it shows the planes
/// and their leader, both nodes and a running pod; when one node's agent stops (SIGSTOP:
/// dead to the cluster, and `capstan dev` does not restart it), the node turns NotReady and
/// its pod is replaced on the other node, on screen, without a reload.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_sees_the_cluster_and_a_node_die() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let ports = common::free_client_ports(3);
    let endpoints: Vec<String> = ports.iter().map(|port| format!("127.0.0.1:{port}")).collect();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_capstan"))
        .arg("dev")
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--client-ports", &ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(output_dir().join("dev.log")).unwrap())
        .spawn()
        .unwrap();
    let _dev = common::Dev(child);
    let dashboard = format!("http://127.0.0.1:{}/", ports[0] + 2);
    let browser = Browser::start().await;
    // The browser shows an error page for a listener not yet up, and does not try again.
    let listener = std::net::SocketAddr::from(([127, 0, 0, 1], ports[0] + 2));
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    while std::net::TcpStream::connect(listener).is_err() {
        assert!(std::time::Instant::now() < deadline, "capstan dev never served its dashboard");
        // Nothing announces when a child of dev starts listening.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    browser.client.goto(&format!("{dashboard}#/cluster")).await.unwrap();
    browser.wait_for(r#".card.plane[data-reachable="true"]"#, 3).await;
    browser.wait_for(r#".card.plane[data-role="leader"]"#, 1).await;
    browser.screenshot("cluster").await;

    let (applied, out, err) = common::ctl(&endpoints.join(","), &["apply", "-f", "-"], WEB);
    assert!(applied, "{out}{err}");
    browser.client.goto(&format!("{dashboard}#/pods")).await.unwrap();
    let running = r#"tr.pod[data-phase="Running"]"#;
    let (node, pod) =
        browser.read_first(running, async |row| Ok((row.attr("data-node").await?, row.attr("data-name").await?))).await;
    let node = node.expect("a running pod's node");
    let pod = pod.expect("a running pod's name");
    browser.screenshot("pods").await;
    // Its page shows the tail of its log, from its node's agent.
    browser.client.goto(&format!("{dashboard}#/pods/{pod}")).await.unwrap();
    let deadline = std::time::Instant::now() + common::CONVERGE_TIMEOUT;
    loop {
        let log = browser.read_first("pre.log", async |log| log.text().await).await;
        if log.contains("hello from web") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the log tail never showed the pod's output");
        // A log is not a store change: nothing pushes it, so the page is loaded again.
        browser.client.refresh().await.unwrap();
    }

    // And its events, read from its history.
    browser.wait_for(r#"tr.event[data-reason="Scheduled"]"#, 1).await;
    browser.screenshot("pod").await;

    browser.client.goto(&format!("{dashboard}#/nodes")).await.unwrap();
    browser.wait_for(r#"tr.node[data-ready="true"]"#, 2).await;
    // Both agents hold their node's lease, renewed seconds ago.
    browser.wait_for(r#"td.lease:not([data-renewed=""])"#, 2).await;
    browser.screenshot("nodes").await;

    // The pod's node dies; the page follows by itself.
    let agent = agent_pid(&node, &data_dir);
    // SAFETY: stopping a process of this test's own dev cluster.
    unsafe { libc::kill(agent, libc::SIGSTOP) };
    browser.wait_for(&format!(r#"tr.node[data-name="{node}"][data-ready="false"]"#), 1).await;
    browser.screenshot("node-not-ready").await;
    browser.client.goto(&format!("{dashboard}#/pods")).await.unwrap();
    browser.wait_for(&format!(r#"tr.pod[data-phase="Running"]:not([data-node="{node}"])"#), 1).await;
    browser.screenshot("pod-moved").await;
    // SAFETY: as above; the agent goes on so that dev stops it cleanly.
    unsafe { libc::kill(agent, libc::SIGCONT) };
}

/// The `capstan-session` cookie a sign-in's response sets, as a `Cookie:` header line.
fn session_cookie(head: &str) -> String {
    let line = head.lines().find(|line| line.to_ascii_lowercase().starts_with("set-cookie:")).expect("a cookie");
    assert!(line.contains("HttpOnly") && line.contains("SameSite=Strict"), "{line}");
    let pair = line.split_once(':').unwrap().1.trim().split(';').next().unwrap();
    format!("Cookie: {pair}")
}

fn sign_in(http: std::net::SocketAddr, user: &str, password: &str) -> (u16, String) {
    let body = serde_json::json!({ "user": user, "password": password }).to_string();
    let (status, head, _) =
        common::http_request(http, "POST", "/api/session", &["Content-Type: application/json"], &body);
    (status, head)
}

fn json_as(http: std::net::SocketAddr, path: &str, cookie: &str) -> (u16, Value) {
    let (status, _, body) = common::http_request(http, "GET", path, &[cookie], "");
    (status, serde_json::from_str(&body).unwrap_or_else(|error| panic!("{path}: not JSON ({error}): {body}")))
}

/// With auth enabled the dashboard asks who is looking and shows each user only what the
/// user may read: a reader of one namespace's pods sees those pods and nothing else, its
/// event stream carries their changes alone; a visitor who has not signed in sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_the_dashboard_shows_each_user_what_the_user_may_read() {
    let cluster = Cluster::start(1);
    let http = cluster.metrics[0];
    let endpoints = format!("--endpoints={}", cluster.endpoints().join(","));
    for command in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "team-a-reader"],
        &["role", "grant-permission", "team-a-reader", "--prefix=true", "read", "/registry/pods/team-a/"],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "team-a-reader"],
        &["auth", "enable"],
    ] {
        let (ok, out) = common::etcdctl(&[&[endpoints.as_str()][..], command].concat());
        assert!(ok, "{command:?}: {out}");
    }
    let root = capstan_client::Credentials { user: Some(("root".into(), "rootpw".into())), ..Default::default() };
    let client = capstan_client::connect_with(&cluster.endpoints(), Duration::from_secs(10), &root).await.unwrap();
    let objects = Objects::new(client);
    objects.create(&Object::Node(Node::ready("n1", "4", "8Gi", "110"))).await.unwrap();
    for (namespace, name) in [("team-a", "a1"), ("team-b", "b1")] {
        objects.create(&Object::Pod(Pod::requesting(namespace, name, &["sleep"], "100m", "64Mi"))).await.unwrap();
    }

    // Not signed in: nothing but the question of who is looking.
    let (status, refused) = json(http, "/api/pods");
    assert!(status == 401 && refused["error"].as_str().unwrap().contains("sign in"), "{status}: {refused}");
    let (status, session) = json(http, "/api/session");
    assert!(status == 200 && session["authEnabled"] == true && session["user"].is_null(), "{session}");
    let (status, _) = sign_in(http, "alice", "wrong");
    assert_eq!(status, 401, "a wrong password signs no one in");
    let (status, _) = json_as(http, "/api/pods", "Cookie: capstan-session=alice.4102444800.forged");
    assert_eq!(status, 401, "a forged session is no session");

    let (status, head) = sign_in(http, "alice", "alicepw");
    assert_eq!(status, 200, "{head}");
    let alice = session_cookie(&head);
    let (_, session) = json_as(http, "/api/session", &alice);
    assert_eq!(session["user"], "alice", "{session}");
    let (status, pods) = json_as(http, "/api/pods", &alice);
    assert_eq!(status, 200, "{pods}");
    assert_eq!(pods["total"], 1, "alice sees team-a's pod alone: {pods}");
    assert_eq!(pods["items"][0]["name"], "a1", "{pods}");
    let (status, _) = json_as(http, "/api/pods/team-a/a1", &alice);
    assert_eq!(status, 200);
    // Refused whether or not the pod exists, so the answer reveals nothing.
    for path in ["/api/pods/team-b/b1", "/api/pods/team-b/nope"] {
        let (status, refused) = json_as(http, path, &alice);
        assert!(status == 403 && refused["error"].as_str().unwrap().contains("permission denied"), "{path}: {refused}");
    }
    let (_, nodes) = json_as(http, "/api/nodes", &alice);
    assert_eq!(nodes["total"], 0, "alice may not read nodes: {nodes}");
    let (status, _) = json_as(http, "/api/cluster", &alice);
    assert_eq!(status, 200, "the planes' state is for anyone signed in, as etcd's Status");

    // Alice's event stream: a change she may not read is not sent; one she may read is.
    let mut lines = event_stream(http, &[&alice]);
    for (namespace, name) in [("team-b", "b2"), ("team-a", "a2")] {
        objects.create(&Object::Pod(Pod::requesting(namespace, name, &["sleep"], "100m", "64Mi"))).await.unwrap();
    }
    let first = streamed(&mut lines, "/registry/");
    assert!(first.contains("/registry/pods/team-a/a2"), "alice was sent {first}");

    // The page asks a visitor to sign in, then shows alice her pods.
    let browser = Browser::start().await;
    browser.client.goto(&format!("http://{http}/#/pods")).await.unwrap();
    browser.wait_for("#signin:not([hidden])", 1).await;
    let field = |id: &'static str| browser.client.find(fantoccini::Locator::Id(id));
    field("signin-user").await.unwrap().send_keys("alice").await.unwrap();
    field("signin-password").await.unwrap().send_keys("alicepw").await.unwrap();
    browser.client.find(fantoccini::Locator::Css("#signin button")).await.unwrap().click().await.unwrap();
    browser.wait_for(r#"tr.pod[data-name="team-a/a1"]"#, 1).await;
    let shown = browser.client.find_all(fantoccini::Locator::Css("tr.pod")).await.unwrap().len();
    assert_eq!(shown, 2, "alice's page shows team-a's two pods and no other");
    browser.screenshot("signed-in").await;

    // Root sees everything; signing out ends the session in the browser.
    let (_, head) = sign_in(http, "root", "rootpw");
    let (_, pods) = json_as(http, "/api/pods", &session_cookie(&head));
    assert_eq!(pods["total"], 4, "{pods}");
    let (status, head, _) = common::http_request(http, "DELETE", "/api/session", &[&alice], "");
    assert!(status == 200 && head.contains("Max-Age=0"), "{head}");
}

/// 5000 nodes and 50k pods: every list comes a page at a time, counted, filtered and
/// paged on the server from its copy of the store, and it follows a write at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_cluster_is_paged_and_filtered_on_the_server() {
    const NODES: usize = 5000;
    const PODS: usize = 50_000;
    const PUTS_PER_TXN: usize = 100;
    let cluster = Cluster::start(1);
    let http = cluster.metrics[0];
    let mut client = capstan_client::connect(&cluster.endpoints(), Duration::from_secs(30)).await.unwrap();
    let nodes = (0..NODES).map(|i| Object::Node(Node::ready(&format!("node-{i:04}"), "64", "256Gi", "110")));
    let pods = (0..PODS).map(|i| {
        let mut pod = Pod::requesting(&format!("ns-{}", i % 10), &format!("pod-{i:05}"), &["sleep"], "100m", "64Mi");
        pod.spec.node_name = format!("node-{:04}", i % NODES);
        Object::Pod(pod)
    });
    let all: Vec<Object> = nodes.chain(pods).collect();
    for chunk in all.chunks(PUTS_PER_TXN) {
        let puts: Vec<etcd_client::TxnOp> =
            chunk.iter().map(|object| etcd_client::TxnOp::put(object.key(), object.encode(), None)).collect();
        client.txn(etcd_client::Txn::new().and_then(puts)).await.unwrap();
    }

    let (status, list) = json(http, "/api/nodes");
    assert_eq!(status, 200, "{list}");
    assert_eq!((list["total"].as_u64(), list["items"].as_array().unwrap().len()), (Some(5000), 100));
    assert_eq!(list["items"][0]["name"], "node-0000", "{}", list["items"][0]);
    assert_eq!(list["items"][0]["pods"]["used"], 10, "{}", list["items"][0]);
    let (_, tail) = json(http, "/api/nodes?offset=4950&limit=100");
    assert_eq!(tail["items"].as_array().unwrap().len(), 50, "{tail}");

    // A page never ships more than its limit, whatever is asked.
    let (status, body) = http_get(http, "/api/pods?limit=1000000");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!((page["total"].as_u64(), page["items"].as_array().unwrap().len()), (Some(50_000), 1000));
    assert!(body.len() < 1 << 20, "a page of pods took {} bytes", body.len());
    let (_, namespace) = json(http, "/api/pods?namespace=ns-3&limit=1");
    assert_eq!(namespace["total"], 5000, "{namespace}");
    let (_, one) = json(http, "/api/pods?q=pod-04242");
    assert_eq!((one["total"].as_u64(), one["items"][0]["node"].as_str()), (Some(1), Some("node-4242")), "{one}");
    let (_, on_node) = json(http, "/api/pods?node=node-0007");
    assert_eq!(on_node["total"], 10, "{on_node}");
    let (status, node) = json(http, "/api/nodes/node-0007");
    assert!(status == 200 && node["pods"].as_array().unwrap().len() == 10, "{node}");

    // A write is in the next read (the read waits for the copy to hold it).
    let late = Pod::requesting("ns-0", "pod-late", &["sleep"], "100m", "64Mi");
    client.put(Object::Pod(late.clone()).key(), Object::Pod(late).encode(), None).await.unwrap();
    let (_, found) = json(http, "/api/pods?q=pod-late");
    assert_eq!(found["total"], 1, "{found}");
}
