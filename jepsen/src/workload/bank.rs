//! The bank workload: a few accounts, each a key; clients move money between two of them
//! in a txn that compares both accounts' mod_revision with what the client read, and
//! read all accounts at one revision (linearizable and serializable reads in turn). Every
//! read must see the same total and no negative balance: a txn applied in part, a read
//! that mixes revisions, or a lost or doubled transfer shows up as a wrong total.

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::check::Check;
use crate::client::{final_client, Endpoints, Session};
use crate::history::{Op, Outcome, Record};

const PREFIX: &str = "jepsen/bank/";
pub const ACCOUNTS: usize = 5;
const INITIAL_BALANCE: i64 = 100;
const TOTAL: i64 = ACCOUNTS as i64 * INITIAL_BALANCE;

fn account_key(account: usize) -> String {
    format!("{PREFIX}{account}")
}

/// Opens the accounts, before any client starts.
pub async fn open_accounts(endpoints: &Endpoints) -> anyhow::Result<()> {
    let mut client = final_client(endpoints).await?;
    let puts: Vec<TxnOp> =
        (0..ACCOUNTS).map(|account| TxnOp::put(account_key(account), INITIAL_BALANCE.to_string(), None)).collect();
    client.txn(Txn::new().and_then(puts)).await?;
    Ok(())
}

/// Every account's balance and mod_revision at one revision; none at all before the bank
/// opened (a serializable read of a plane that has just joined may see that). A balance
/// that is missing or not a number reads as `i64::MIN`, which the checker reports.
async fn read_accounts(
    client: &mut etcd_client::Client,
    serializable: bool,
) -> Result<Vec<(i64, i64)>, etcd_client::Error> {
    let mut options = GetOptions::new().with_prefix();
    if serializable {
        options = options.with_serializable();
    }
    let response = client.get(PREFIX, Some(options)).await?;
    if response.kvs().is_empty() {
        return Ok(Vec::new());
    }
    let mut accounts = vec![(i64::MIN, 0); ACCOUNTS];
    for kv in response.kvs() {
        let account =
            std::str::from_utf8(kv.key()).ok().and_then(|key| key.strip_prefix(PREFIX)?.parse::<usize>().ok());
        if let Some(slot) = account.and_then(|account| accounts.get_mut(account)) {
            let balance = std::str::from_utf8(kv.value()).ok().and_then(|value| value.parse().ok());
            *slot = (balance.unwrap_or(i64::MIN), kv.mod_revision());
        }
    }
    Ok(accounts)
}

/// One client: reads and transfers in turn until the deadline.
pub async fn client(mut session: Session, mut rng: fastrand::Rng) -> Vec<Record> {
    let mut serializable = false;
    while session.run.going() {
        let Some(mut client) = session.client().await else { continue };
        serializable = !serializable;
        let call = session.run.clock.now();
        let accounts = match read_accounts(&mut client, serializable).await {
            Ok(accounts) => accounts,
            Err(error) => {
                let outcome = session.failed(&error);
                session.record(call, outcome, Op::ReadBank { balances: Vec::new(), serializable });
                continue;
            }
        };
        let balances = accounts.iter().map(|(balance, _)| *balance).collect();
        session.record(call, Outcome::Ok, Op::ReadBank { balances, serializable });
        if rng.bool() || accounts.is_empty() {
            continue;
        }
        let (from, to) = (rng.usize(..ACCOUNTS), rng.usize(..ACCOUNTS - 1));
        let to = if to >= from { to + 1 } else { to };
        let ((from_balance, from_revision), (to_balance, to_revision)) = (accounts[from], accounts[to]);
        if from_balance <= 0 || to_balance == i64::MIN {
            continue;
        }
        let amount = rng.i64(1..=from_balance.min(5));
        let txn = Txn::new()
            .when([
                Compare::mod_revision(account_key(from), CompareOp::Equal, from_revision),
                Compare::mod_revision(account_key(to), CompareOp::Equal, to_revision),
            ])
            .and_then([
                TxnOp::put(account_key(from), (from_balance - amount).to_string(), None),
                TxnOp::put(account_key(to), (to_balance + amount).to_string(), None),
            ]);
        let call = session.run.clock.now();
        let (outcome, succeeded) = match client.txn(txn).await {
            Ok(response) => (Outcome::Ok, response.succeeded()),
            Err(error) => (session.failed(&error), false),
        };
        session.record(call, outcome, Op::Transfer { from, to, amount, succeeded });
        session.run.pace().await;
    }
    session.history
}

/// Every completed read must show all accounts, none negative, summing to the total; only
/// a serializable read may come from before the bank opened and show none.
pub fn check(history: &[Record]) -> Check {
    let (mut reads, mut serializable_reads, mut transfers, mut before_opening) = (0, 0, 0, 0);
    let mut bad = Vec::new();
    for record in history.iter().filter(|record| record.outcome == Outcome::Ok) {
        match &record.op {
            Op::ReadBank { balances, serializable } => {
                reads += 1;
                serializable_reads += usize::from(*serializable);
                if balances.is_empty() && *serializable {
                    before_opening += 1;
                    continue;
                }
                let total = balances.iter().fold(0i64, |total, balance| total.saturating_add(*balance));
                let wrong = balances.len() != ACCOUNTS || balances.iter().any(|balance| *balance < 0);
                if wrong || total != TOTAL {
                    bad.push(serde_json::json!({"call": record.call, "balances": balances, "total": total}));
                }
            }
            Op::Transfer { succeeded: true, .. } => transfers += 1,
            _ => {}
        }
    }
    let valid = bad.is_empty() && reads > 0;
    let summary = match (bad.first(), reads) {
        (_, 0) => "no read completed".to_string(),
        (None, _) => format!(
            "{reads} reads ({serializable_reads} serializable, {before_opening} of them from before the bank \
             opened) all total {TOTAL} with no account negative; {transfers} transfers"
        ),
        (Some(first), _) => format!("{} of {reads} reads are WRONG; the first: {first}", bad.len()),
    };
    Check {
        valid,
        summary,
        detail: serde_json::json!({
            "reads": reads, "serializable_reads": serializable_reads, "before_opening": before_opening,
            "transfers": transfers, "total": TOTAL, "bad_reads": bad,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Process;

    fn read(balances: &[i64], outcome: Outcome) -> Record {
        read_as(balances, outcome, false)
    }

    fn read_as(balances: &[i64], outcome: Outcome, serializable: bool) -> Record {
        let op = Op::ReadBank { balances: balances.to_vec(), serializable };
        Record { process: Process::Client(0), outcome, call: 0, ret: 1, op }
    }

    #[test]
    fn every_read_must_conserve_the_total() {
        let good = [read(&[100; 5], Outcome::Ok), read(&[95, 105, 100, 100, 100], Outcome::Ok)];
        let verdict = check(&good);
        assert!(verdict.valid, "{}", verdict.summary);
        // A failed read says nothing.
        assert!(check(&[good[0].clone(), read(&[], Outcome::Info)]).valid);

        // A serializable read may come from before the bank opened; a linearizable one not.
        assert!(check(&[good[0].clone(), read_as(&[], Outcome::Ok, true)]).valid);
        assert!(!check(&[good[0].clone(), read(&[], Outcome::Ok)]).valid);

        let missing = [100, 100, i64::MIN, 100, 200];
        for wrong in [&[95, 100, 100, 100, 100][..], &[-5, 105, 100, 200, 100], &[100, 100, 100, 100], &missing] {
            let verdict = check(&[good[0].clone(), read(wrong, Outcome::Ok)]);
            assert!(!verdict.valid, "{wrong:?} passed");
            assert_eq!(verdict.detail["bad_reads"].as_array().unwrap().len(), 1);
        }
        assert!(!check(&[read(&[], Outcome::Info)]).valid, "a run with no read proves nothing");
    }
}
