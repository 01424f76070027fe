//! Auto-compaction on a real cluster: with `--auto-compaction-mode periodic
//! --auto-compaction-retention 2s`, history older than the retention is compacted on
//! every plane, while the current state stays readable.

mod common;

use std::time::Duration;

use common::Cluster;
use etcd_client::{Client, GetOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_compacts_history_older_than_the_retention() {
    let cluster = Cluster::start_with(3, &["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "2s"]);
    let mut client = Client::connect([cluster.planes[0].endpoint()], None).await.unwrap();
    let first = client.put("a", "1", None).await.unwrap().header().unwrap().revision();
    // Writes go on; each plane's view of revision `first` goes once it is compacted.
    let compacted = async {
        for plane in &cluster.planes {
            let mut reader = Client::connect([plane.endpoint()], None).await.unwrap();
            loop {
                client.put("b", "more", None).await.unwrap();
                let old = reader.get("a", Some(GetOptions::new().with_revision(first).with_serializable())).await;
                match old {
                    Err(error) if error.to_string().contains("required revision has been compacted") => break,
                    Err(error) => panic!("{error}"),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), compacted).await.expect("history was compacted on every plane");
    let now = client.get("a", None).await.unwrap();
    assert_eq!(now.kvs()[0].value(), b"1", "compaction keeps the current state");
}
