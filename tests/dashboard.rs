//! The dashboard's server side, on a real 3-plane cluster with its scheduler: the page and
//! its assets are served; every API endpoint the page uses answers with the cluster's
//! state (planes and leader, nodes with their allocation, pods filtered and paged on the
//! server, replica sets); unknown objects are 404s; the event stream reports changes as
//! they happen; and a plane that lost its quorum says so instead of serving stale rows.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use capstan_client::Objects;
use capstan_proto::objects::{Node, Object, Pod};
use common::{http_get, leader_index, wait_for, Cluster};
use serde_json::Value;

fn json(address: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(address, path);
    (status, serde_json::from_str(&body).unwrap_or_else(|error| panic!("{path}: not JSON ({error}): {body}")))
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
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream.set_read_timeout(Some(common::CONVERGE_TIMEOUT)).unwrap();
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut lines = BufReader::new(stream).lines().map_while(Result::ok);
    assert!(lines.next().unwrap().contains("200"), "the stream opens");
    // The stream is open once its headers are through; then the change is made.
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
    }
    let pod = Pod::requesting("default", "late", &["sleep", "600"], "100m", "64Mi");
    objects.create(&Object::Pod(pod)).await.unwrap();
    let change = lines.find(|line| line.contains("/registry/pods/default/late")).expect("the change is streamed");
    assert!(change.contains("\"PUT\""), "{change}");

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
