//! Three real `hopperd` processes form a cluster: they elect a leader, agree on the queues
//! declared on any of them, replace a leader killed with `kill -9`, and take back a restarted
//! node, which catches up on what it missed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hopper_client::{
    ClusterStatus, Connection, ConsumeOptions, DeleteOptions, ErrorCode, ExchangeKind, ExchangeOptions,
    QueueOptions,
};
use hopper_tests::{connect, eventually, run_cli, Broker, Proxy};

/// Free loopback ports for the cluster listeners, which every node must know before any
/// starts, so they cannot be port 0. They come from below the kernel's ephemeral range (where
/// port-0 binds of this and other tests land), each handed out once per test process, and
/// only if nothing listens there now.
fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 400) * 25;
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(base + offset % 10_000).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

struct Cluster {
    nodes: Vec<Broker>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Starts `n` nodes with `args` as extra flags for each. Each listens for clients on a port
    /// of its own that it keeps when restarted, as a node of a real cluster does, so that
    /// clients given the nodes' addresses find it again.
    fn start_with(n: usize, args: &[&str]) -> Cluster {
        let ports = free_ports(n);
        let client_ports = free_ports(n);
        let peers: Vec<String> =
            ports.iter().enumerate().map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1)).collect();
        let peers = peers.join(",");
        let nodes = (0..n)
            .map(|i| {
                let id = (i + 1).to_string();
                let listen = format!("127.0.0.1:{}", ports[i]);
                let clients = format!("127.0.0.1:{}", client_ports[i]);
                let mut flags = vec![
                    "--node-id",
                    &id,
                    "--cluster-listen",
                    &listen,
                    "--peers",
                    &peers,
                    "--listen",
                    &clients,
                ];
                flags.extend_from_slice(args);
                Broker::start_with(&flags)
            })
            .collect();
        Cluster { nodes }
    }

    /// Node `id` (1-based).
    fn node(&mut self, id: u64) -> &mut Broker {
        &mut self.nodes[id as usize - 1]
    }

    /// Waits until every running node names the same leader, among the running nodes.
    async fn agreed_leader(&mut self, within: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let mut leaders = BTreeSet::new();
            let mut running = BTreeSet::new();
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if !node.is_running() {
                    continue;
                }
                running.insert(i as u64 + 1);
                leaders.insert(cluster_status(node).await.and_then(|s| s.leader));
            }
            if let [Some(leader)] = leaders.iter().copied().collect::<Vec<_>>()[..] {
                if running.contains(&leader) {
                    return leader;
                }
            }
            assert!(started.elapsed() < within, "no agreed leader after {within:?}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A node's cluster status, or `None` if it does not answer.
async fn cluster_status(node: &Broker) -> Option<ClusterStatus> {
    let conn = Connection::connect(&node.addr().to_string()).await.ok()?;
    let status = conn.cluster_status().await.ok();
    let _ = conn.close().await;
    status
}

async fn queue_names(node: &Broker) -> Vec<String> {
    let conn = connect(node).await;
    let names = conn.list_queues().await.unwrap().into_iter().map(|q| q.name).collect();
    let _ = conn.close().await;
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_and_agree_on_the_queues() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.agreed_leader(Duration::from_secs(10)).await;

    let status = cluster_status(cluster.node(leader)).await.expect("the leader answers");
    assert_eq!(status.state, "leader");
    assert_eq!(status.members.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(status.members.iter().all(|m| m.voter));

    // Declared on a follower (forwarded to the leader), on the leader, and deleted on another
    // follower: once each call returns, the node asked shows the change.
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let conn = connect(cluster.node(followers[0])).await;
    conn.declare_queue("orders", QueueOptions { durable: true, ..QueueOptions::default() }).await.unwrap();
    assert_eq!(queue_names(cluster.node(followers[0])).await, ["orders"]);
    connect(cluster.node(leader)).await.declare_queue("audit", QueueOptions::default()).await.unwrap();
    connect(cluster.node(followers[1])).await.delete_queue("audit", DeleteOptions::default()).await.unwrap();
    assert_eq!(queue_names(cluster.node(followers[1])).await, ["orders"]);

    // A declare that contradicts the catalog is refused alike, with the broker's own error.
    let refused = conn.declare_queue("orders", QueueOptions::default()).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::PreconditionFailed), "{refused}");

    // Every node converges on the same catalog.
    for id in 1..=3 {
        let node = cluster.node(id);
        eventually("every node lists the same queues", Duration::from_secs(5), || async {
            queue_names(node).await == ["orders"]
        })
        .await;
    }

    // Without a cluster the request is refused clearly.
    let single = Broker::start();
    let error = connect(&single).await.cluster_status().await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::NotFound), "{error}");
    assert!(error.to_string().contains("not in a cluster"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_catches_up_when_back() {
    let mut cluster = Cluster::start(3);
    let old = cluster.agreed_leader(Duration::from_secs(10)).await;
    let survivor = (1..=3).find(|id| *id != old).unwrap();

    cluster.node(old).kill();
    // The survivors elect a new leader, and a metadata change commits through it. (How fast
    // is measured in docs/benchmarks.md, not here.)
    let new = cluster.agreed_leader(Duration::from_secs(10)).await;
    assert_ne!(new, old);
    connect(cluster.node(survivor)).await.declare_queue("after", QueueOptions::default()).await.unwrap();

    let status = cluster_status(cluster.node(new)).await.unwrap();
    assert_eq!(status.state, "leader");
    assert!(status.term >= 2, "a new term: {status:?}");

    // The old leader comes back as a follower and applies what it missed.
    cluster.node(old).restart();
    let back = cluster.node(old);
    eventually(
        "the restarted node has the queue declared while it was down",
        Duration::from_secs(10),
        || async { queue_names(back).await == ["after"] },
    )
    .await;
    let status = cluster_status(cluster.node(old)).await.unwrap();
    assert_eq!(status.leader, Some(new), "{status:?}");
    assert_eq!(status.state, "follower");

    let cli = run_cli(cluster.node(new), &["cluster", "status", "--json"]).await;
    assert!(cli.success(), "{}", cli.stderr);
    let json: serde_json::Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(json["leader"], new);
    assert_eq!(json["members"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_catches_up_and_a_member_leaves() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.agreed_leader(Duration::from_secs(10)).await;
    connect(cluster.node(leader)).await.declare_queue("before-join", QueueOptions::default()).await.unwrap();

    // A node started with an id and a cluster address but no peers waits to be added.
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let fourth = Broker::start_with(&["--node-id", "4", "--cluster-listen", &addr]);
    let waiting = cluster_status(&fourth).await.expect("the new node answers");
    assert_eq!(waiting.leader, None);

    // Asked of a follower, which forwards it to the leader.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let status = connect(cluster.node(follower)).await.cluster_add_node(4, &addr).await.unwrap();
    assert_eq!(
        status.members.iter().map(|m| (m.id, m.voter)).collect::<Vec<_>>(),
        [(1, true), (2, true), (3, true), (4, true)]
    );
    cluster.nodes.push(fourth);
    eventually("the new node applied the catalog from before it joined", Duration::from_secs(10), || async {
        queue_names(&cluster.nodes[3]).await == ["before-join"]
    })
    .await;
    assert_eq!(cluster.agreed_leader(Duration::from_secs(10)).await, leader);

    // Adding it twice is refused clearly.
    let again = connect(cluster.node(leader)).await.cluster_add_node(4, &addr).await.unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::PreconditionFailed), "{again}");

    // The leader itself leaves; the others go on with a new one.
    let cli =
        run_cli(cluster.node(follower), &["cluster", "remove-node", &leader.to_string(), "--json"]).await;
    assert!(cli.success(), "{}", cli.stderr);
    let after: serde_json::Value = serde_json::from_str(&cli.stdout).unwrap();
    let ids: Vec<u64> =
        after["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert!(!ids.contains(&leader) && ids.len() == 3, "{after}");
    cluster.node(leader).kill();
    let new = cluster.agreed_leader(Duration::from_secs(10)).await;
    assert_ne!(new, leader);
    connect(cluster.node(4)).await.declare_queue("after-leave", QueueOptions::default()).await.unwrap();
    let missing = connect(cluster.node(new)).await.cluster_remove_node(leader).await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");
}

/// What a node holds: its queues, exchanges and bindings (source -> destination).
async fn topology(node: &Broker) -> (Vec<String>, Vec<String>, Vec<String>) {
    let conn = connect(node).await;
    let exchanges = conn.list_exchanges().await.unwrap().into_iter().map(|x| x.name).collect();
    let bindings = conn
        .list_bindings(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|b| format!("{}->{}", b.source, b.destination));
    let queues = queue_names(node).await;
    let _ = conn.close().await;
    (queues, exchanges, bindings.collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_and_bindings_are_replicated_and_a_node_far_behind_catches_up_from_a_snapshot() {
    // A snapshot every 5 entries, and the log before it dropped: a node down for more than
    // that can only catch up from a snapshot.
    let mut cluster = Cluster::start_with(3, &["--cluster-snapshot-entries", "5"]);
    let leader = cluster.agreed_leader(Duration::from_secs(10)).await;
    let [a, b]: [u64; 2] = (1..=3).filter(|id| *id != leader).collect::<Vec<_>>().try_into().unwrap();

    let fanout = ExchangeOptions { durable: true, ..ExchangeOptions::default() };
    connect(cluster.node(leader))
        .await
        .declare_exchange("events", ExchangeKind::Fanout, fanout)
        .await
        .unwrap();
    let durable = QueueOptions { durable: true, ..QueueOptions::default() };
    connect(cluster.node(a)).await.declare_queue("audit", durable.clone()).await.unwrap();
    connect(cluster.node(a)).await.declare_queue("doomed", durable).await.unwrap();
    let conn = connect(cluster.node(b)).await;
    assert!(conn.bind_queue("audit", "events", "", Default::default()).await.unwrap());
    assert!(!conn.bind_queue("audit", "events", "", Default::default()).await.unwrap(), "bound already");
    let refused = conn.delete_exchange("events", true).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::PreconditionFailed), "{refused}");
    let expected = (
        vec!["audit".to_string(), "doomed".to_string()],
        vec!["events".to_string()],
        vec!["events->audit".to_string()],
    );
    for id in 1..=3 {
        let node = cluster.node(id);
        eventually("every node holds the topology", Duration::from_secs(5), || async {
            topology(node).await == expected
        })
        .await;
    }

    // While `a` is down: a deleted durable queue (that `a` still has on disk), many changes,
    // and a binding removed.
    cluster.node(a).kill();
    let conn = connect(cluster.node(leader)).await;
    conn.delete_queue("doomed", DeleteOptions::default()).await.unwrap();
    for n in 0..12 {
        conn.declare_queue(&format!("q{n:02}"), QueueOptions::default()).await.unwrap();
    }
    for n in 0..6 {
        conn.delete_queue(&format!("q{n:02}"), DeleteOptions::default()).await.unwrap();
    }
    conn.declare_exchange("logs", ExchangeKind::Topic, ExchangeOptions::default()).await.unwrap();
    assert!(conn
        .unbind(hopper_client::BindingInfo {
            source: "events".into(),
            destination: "audit".into(),
            to_exchange: false,
            routing_key: String::new(),
            arguments: Default::default(),
        })
        .await
        .unwrap());

    cluster.node(a).restart();
    let mut queues: Vec<String> = (6..12).map(|n| format!("q{n:02}")).collect();
    queues.insert(0, "audit".into());
    let expected = (queues, vec!["events".to_string(), "logs".to_string()], Vec::<String>::new());
    let back = cluster.node(a);
    eventually("the restarted node holds what the others hold", Duration::from_secs(10), || async {
        topology(back).await == expected
    })
    .await;
    let log = cluster.node(a).stderr();
    assert!(log.contains("took over the leader's snapshot"), "caught up some other way:\n{log}");
    let status = cluster_status(cluster.node(leader)).await.unwrap();
    assert!(status.members.iter().all(|m| m.lag.is_some()), "{status:?}");
}

async fn login(node: &Broker, user: &str, password: &str) -> Result<Connection, hopper_client::Error> {
    let credentials = Some(hopper_client::Credentials::new(user, password));
    Connection::connect_with(
        node.addr().to_string(),
        hopper_client::ConnectOptions { credentials, ..Default::default() },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_permissions_made_on_one_node_hold_on_every_node() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;

    // The first admin, made as the built-in guest on node 1: from then on the guest is refused
    // on every node, and the new user logs in anywhere with the password given on node 1.
    let added = run_cli(cluster.node(1), &["user", "add", "ops", "s3cret", "--tags", "admin"]).await;
    assert!(added.success(), "{}", added.stderr);
    for id in [2, 3] {
        let node = cluster.node(id);
        eventually("the user reaches every node", Duration::from_secs(5), || async {
            login(node, "ops", "s3cret").await.is_ok()
        })
        .await;
        assert!(matches!(login(node, "ops", "wrong").await, Err(hopper_client::Error::Authentication(_))));
        assert!(
            Connection::connect(node.addr().to_string()).await.is_err(),
            "the guest is off once an admin exists"
        );
    }

    // Permissions set on node 2 govern what the user may do on node 3.
    let ops = login(cluster.node(3), "ops", "s3cret").await.unwrap();
    let refused = ops.declare_queue("jobs", QueueOptions::default()).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::AccessRefused), "{refused}");
    let set = run_cli(
        cluster.node(2),
        &[
            "--user",
            "ops",
            "--password",
            "s3cret",
            "permissions",
            "set",
            "ops",
            "--configure",
            ".*",
            "--write",
            ".*",
            "--read",
            ".*",
        ],
    )
    .await;
    assert!(set.success(), "{}", set.stderr);
    eventually("the permissions reach node 3", Duration::from_secs(5), || async {
        ops.declare_queue("jobs", QueueOptions::default()).await.is_ok()
    })
    .await;

    // A user deleted on node 3 can no longer log in on node 1.
    let made =
        run_cli(cluster.node(3), &["--user", "ops", "--password", "s3cret", "user", "add", "tmp", "pw"])
            .await;
    assert!(made.success(), "{}", made.stderr);
    let node = cluster.node(1);
    eventually("the new user reaches node 1", Duration::from_secs(5), || async {
        login(node, "tmp", "pw").await.is_ok()
    })
    .await;
    let gone =
        run_cli(cluster.node(3), &["--user", "ops", "--password", "s3cret", "user", "delete", "tmp"]).await;
    assert!(gone.success(), "{}", gone.stderr);
    assert!(matches!(
        login(cluster.node(3), "tmp", "pw").await,
        Err(hopper_client::Error::Authentication(_))
    ));
    let node = cluster.node(1);
    eventually("the deletion reaches node 1", Duration::from_secs(5), || async {
        login(node, "tmp", "pw").await.is_err()
    })
    .await;
}

/// The node serving replicated queue `queue`, once every running node agrees on one.
async fn serving_node(cluster: &mut Cluster, queue: &str) -> u64 {
    let started = Instant::now();
    loop {
        let mut seen = BTreeSet::new();
        for node in cluster.nodes.iter_mut() {
            if node.is_running() {
                let info = connect(node).await.queue_stats(queue).await.ok();
                seen.insert(info.and_then(|info| info.served_by));
            }
        }
        if let [Some(leader)] = seen.iter().copied().collect::<Vec<_>>()[..] {
            if cluster.node(leader).is_running() {
                return leader;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no agreed queue leader: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready_on(node: &Broker, queue: &str) -> u64 {
    connect(node).await.queue_stats(queue).await.map(|q| q.ready).unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_queue_loses_its_serving_node_and_no_confirmed_or_acked_message() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("orders", replicated).await.unwrap();
    let serving = serving_node(&mut cluster, "orders").await;
    let other = (1..=3).find(|id| *id != serving).unwrap();

    // Published through a node that does not serve the queue: confirmed once a majority holds
    // each message.
    let publisher = connect(cluster.node(other)).await;
    let bodies: Vec<String> = (0..100).map(|n| format!("order {n:03}")).collect();
    hopper_tests::publish_all(&publisher, "orders", bodies.clone()).await;

    // Consumers attach where the queue is served, and only there.
    let refused = publisher.consume("orders", ConsumeOptions::default()).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotAllowed), "{refused}");
    assert!(refused.to_string().contains(&format!("served by node {serving}")), "{refused}");
    let conn = connect(cluster.node(serving)).await;
    let mut consumer =
        conn.consume("orders", ConsumeOptions { prefetch: 40, ..Default::default() }).await.unwrap();
    let first = hopper_tests::next_deliveries(&mut consumer, 40).await;
    let acked: Vec<String> = first.iter().map(hopper_tests::body_text).collect();
    assert_eq!(acked, bodies[..40], "delivered in the order published");
    for delivery in first {
        assert!(!delivery.redelivered);
        delivery.ack().await.unwrap();
    }
    // The acks reach every node before the serving one dies.
    for id in 1..=3 {
        let node = cluster.node(id);
        eventually("every copy drops the acked messages", Duration::from_secs(5), || async {
            let ready = ready_on(node, "orders").await;
            // The serving node holds its prefetched deliveries as unacked, not ready.
            if id == serving {
                ready <= 60
            } else {
                ready == 60
            }
        })
        .await;
    }

    cluster.node(serving).kill();
    let next = serving_node(&mut cluster, "orders").await;
    assert_ne!(next, serving);
    let conn = connect(cluster.node(next)).await;
    let mut consumer =
        conn.consume("orders", ConsumeOptions { prefetch: 100, ..Default::default() }).await.unwrap();
    let rest = hopper_tests::next_deliveries(&mut consumer, 60).await;
    let got: Vec<String> = rest.iter().map(hopper_tests::body_text).collect();
    assert_eq!(got, bodies[40..], "every confirmed, unacked message, in order, none acked");
    // The node that died may have delivered them: every one says so.
    assert!(rest.iter().all(|d| d.redelivered), "unflagged redelivery");
    for delivery in &rest {
        delivery.ack().await.unwrap();
    }

    // Publishing goes on through the survivors, and the queue's copies agree again.
    let survivor = (1..=3).find(|id| *id != serving && *id != next).unwrap();
    connect(cluster.node(survivor)).await.publish("orders", "after", Default::default()).await.unwrap();
    let after = hopper_tests::next_delivery(&mut consumer).await;
    assert_eq!(hopper_tests::body_text(&after), "after");
    assert!(!after.redelivered);
    after.ack().await.unwrap();

    // The node that died comes back with an empty copy, like the others.
    cluster.node(serving).restart();
    let back = cluster.node(serving);
    eventually("the restarted node's copy catches up", Duration::from_secs(10), || async {
        ready_on(back, "orders").await == 0
    })
    .await;
}

#[tokio::test]
async fn replicated_queues_need_a_cluster_and_settings_every_copy_can_follow_and_take_delays() {
    let single = Broker::start();
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    let error = connect(&single).await.declare_queue("q", replicated.clone()).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InvalidArgument), "{error}");
    assert!(error.to_string().contains("not in a cluster"), "{error}");

    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let conn = connect(cluster.node(2)).await;
    let bounded = QueueOptions { max_length: Some(10), ..replicated.clone() };
    let error = conn.declare_queue("q", bounded).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InvalidArgument), "{error}");
    assert!(error.to_string().contains("a length limit"), "{error}");
    let two = QueueOptions { replicas: Some(2), ..replicated.clone() };
    let error = conn.declare_queue("q", two).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::InvalidArgument), "{error}");
    assert!(error.to_string().contains("each of its 3 nodes"), "{error}");
    let info =
        conn.declare_queue("q", QueueOptions { replicas: Some(3), ..replicated.clone() }).await.unwrap();
    assert!(info.replicated && !info.durable, "{info:?}");
    // The same queue, declared again without a count: one copy per node either way.
    conn.declare_queue("q", replicated).await.unwrap();
    let cli = run_cli(cluster.node(3), &["queue", "declare", "q", "--replicas", "3"]).await;
    assert!(cli.status.success(), "{cli}");

    // A delayed publish waits in every copy, then is delivered where the queue is served.
    let delayed = hopper_client::PublishOptions { delay: Some(Duration::from_secs(1)), ..Default::default() };
    conn.publish("q", "later", delayed).await.unwrap();
    let serving = serving_node(&mut cluster, "q").await;
    let server = connect(cluster.node(serving)).await;
    let stats = server.queue_stats("q").await.unwrap();
    assert_eq!((stats.ready, stats.delayed), (0, 1), "the serving node applied it first: {stats:?}");
    let mut consumer = server.consume("q", ConsumeOptions::default()).await.unwrap();
    let delivery = hopper_tests::next_delivery(&mut consumer).await;
    assert_eq!(hopper_tests::body_text(&delivery), "later");
    assert!(delivery.published_at_ms + 1000 <= hopper_tests::unix_ms(), "not before its delay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_queues_spread_over_groups_each_served_by_its_leader() {
    // One group per node: once each node leads one, every node serves replicated queues.
    let mut cluster = Cluster::start_with(3, &["--queue-groups", "3"]);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let status = loop {
        let status = cluster_status(cluster.node(1)).await.unwrap();
        if status.queue_leaders.iter().all(Option::is_some) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.queue_leaders.len(), 3, "{status:?}");
    // Each group's first leader is its preferred node: every node leads one.
    let leaders: BTreeSet<u64> = status.queue_leaders.iter().flatten().copied().collect();
    assert_eq!(leaders, BTreeSet::from([1, 2, 3]), "{status:?}");
    for (group, leader) in status.queue_leaders.iter().enumerate() {
        assert_eq!(*leader, hopper_broker::cluster::preferred_leader(group + 1, &[1, 2, 3]), "{status:?}");
    }

    // Queues land in every group; each is served by its group's leader, and works there.
    let conn = connect(cluster.node(1)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    let mut groups = BTreeSet::new();
    for n in 0..12 {
        let name = format!("spread-{n}");
        conn.declare_queue(&name, replicated.clone()).await.unwrap();
        let serving = serving_node(&mut cluster, &name).await;
        let group = hopper_broker::cluster::queue_group(&name, 3);
        groups.insert(group);
        let leaders = cluster_status(cluster.node(serving)).await.unwrap().queue_leaders;
        assert_eq!(leaders[group - 1], Some(serving), "{name} is served by its group's leader");
        conn.publish(&name, format!("to {name}"), Default::default()).await.unwrap();
        let server = connect(cluster.node(serving)).await;
        let mut consumer = server.consume(&name, ConsumeOptions::default()).await.unwrap();
        let delivery = hopper_tests::next_delivery(&mut consumer).await;
        assert_eq!(hopper_tests::body_text(&delivery), format!("to {name}"));
        delivery.ack().await.unwrap();
    }
    assert_eq!(groups.len(), 3, "twelve names hash to every group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_any_node_is_sent_to_the_serving_node_and_follows_it_when_it_dies() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("jobs", replicated).await.unwrap();
    let serving = serving_node(&mut cluster, "jobs").await;
    let other = (1..=3).find(|id| *id != serving).unwrap();
    let other_addr = cluster.node(other).addr().to_string();
    let serving_addr = cluster.node(serving).addr().to_string();

    // Every node tells the cluster where its clients reach it.
    eventually("every member's client address is known", Duration::from_secs(10), || async {
        let status = cluster_status(cluster.nodes.first().unwrap()).await.unwrap();
        status.members.iter().all(|m| m.client_addr.is_some())
    })
    .await;
    let status = cluster_status(cluster.node(other)).await.unwrap();
    let member = status.members.iter().find(|m| m.id == serving).unwrap();
    assert_eq!(member.client_addr.as_deref(), Some(serving_addr.as_str()));

    // A plain connection is told where to go.
    let plain = Connection::connect(&other_addr).await.unwrap();
    match plain.consume("jobs", ConsumeOptions::default()).await {
        Err(hopper_client::Error::ServedElsewhere { addr, message }) => {
            assert_eq!(addr, serving_addr, "{message}");
        }
        other => panic!("expected a redirect, got {:?}", other.map(|_| ())),
    }

    // So is the CLI, which consumes there when given the cluster's brokers.
    let publisher = connect(cluster.node(other)).await;
    publisher.publish("jobs", "for the CLI", Default::default()).await.unwrap();
    let mut consume = hopper_tests::cli_at(&format!("{other_addr},{serving_addr}"));
    consume.args(["consume", "jobs", "--count", "1"]);
    let output = hopper_tests::run(consume).await;
    assert!(output.status.success(), "{output}");
    assert_eq!(output.stdout, "for the CLI\n", "{output}");
    let single = run_cli(cluster.node(other), &["consume", "jobs", "--count", "1"]).await;
    assert!(!single.status.success(), "{single}");
    assert!(single.stderr.contains(&format!("served by node {serving}")), "{single}");
    assert!(single.stderr.contains(&serving_addr), "names where to go: {single}");

    // A recovering client connected elsewhere consumes all the same, on the serving node.
    let bodies: Vec<String> = (0..20).map(|n| format!("job {n:02}")).collect();
    hopper_tests::publish_all(&publisher, "jobs", bodies.clone()).await;
    let client = hopper_client::Recovering::connect(
        vec![other_addr.clone()],
        Default::default(),
        hopper_client::RecoveryOptions {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
        },
    )
    .await
    .unwrap();
    let mut consumer =
        client.consume("jobs", ConsumeOptions { prefetch: 5, ..Default::default() }).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let delivery = next_recovered(&mut consumer).await;
        seen.push(hopper_tests::body_text(&delivery));
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen, bodies[..10], "in order, from the serving node");
    // The acks reach every copy before the serving node dies.
    for id in 1..=3 {
        let node = cluster.node(id);
        eventually("every copy drops the acked messages", Duration::from_secs(5), || async {
            ready_on(node, "jobs").await <= 10
        })
        .await;
    }

    // The serving node dies: the consumer follows the queue to the next one, and nothing
    // acked comes back.
    cluster.node(serving).kill();
    let mut rest = Vec::new();
    while rest.len() < 10 {
        let delivery = next_recovered(&mut consumer).await;
        let body = hopper_tests::body_text(&delivery);
        assert!(!seen.contains(&body), "acked message {body} came back");
        if !rest.contains(&body) {
            rest.push(body);
        }
        // A delivery that came before the loss cannot be acked any more: it comes back.
        match delivery.ack().await {
            Ok(()) | Err(hopper_client::Error::Closed(_)) => {}
            Err(other) => panic!("ack failed: {other}"),
        }
    }
    rest.sort();
    assert_eq!(rest, bodies[10..]);
    publisher.publish("jobs", "after the failover", Default::default()).await.unwrap();
    let after = next_recovered(&mut consumer).await;
    assert_eq!(hopper_tests::body_text(&after), "after the failover");
    after.ack().await.unwrap();
}

/// The next delivery of a recovering consumer, within the failover bar and then some.
async fn next_recovered(consumer: &mut hopper_client::RecoveringConsumer) -> hopper_client::Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer goes on")
        .expect("a delivery, not an error")
}

/// Three nodes whose links to each other run through proxies: `links[&(from, to)]` carries
/// node `from`'s traffic to node `to` (and the answers), so a test can cut any of them.
async fn start_behind_proxies() -> (Cluster, BTreeMap<(u64, u64), Proxy>) {
    let ports = free_ports(3);
    let real = |id: u64| format!("127.0.0.1:{}", ports[id as usize - 1]);
    let mut links = BTreeMap::new();
    for from in 1..=3 {
        for to in (1..=3).filter(|to| *to != from) {
            links.insert((from, to), Proxy::start(real(to)).await);
        }
    }
    let nodes = (1..=3u64)
        .map(|id| {
            let peers: Vec<String> = (1..=3u64)
                .map(|to| match to == id {
                    true => format!("{to}={}", real(id)),
                    false => format!("{to}={}", links[&(id, to)].addr()),
                })
                .collect();
            let (id_text, listen, peers) = (id.to_string(), real(id), peers.join(","));
            Broker::start_with(&["--node-id", &id_text, "--cluster-listen", &listen, "--peers", &peers])
        })
        .collect();
    (Cluster { nodes }, links)
}

/// Cuts (or heals) every link to and from `node`.
fn isolate(links: &BTreeMap<(u64, u64), Proxy>, node: u64, cut: bool) {
    for ((from, to), proxy) in links {
        match (*from == node || *to == node, cut) {
            (true, true) => proxy.cut(),
            (true, false) => proxy.heal(),
            (false, _) => {}
        }
    }
}

/// The node serving `queue` once nodes `ids` agree on one among them.
async fn serving_among(cluster: &mut Cluster, ids: &[u64], queue: &str) -> u64 {
    let started = Instant::now();
    loop {
        let mut seen = BTreeSet::new();
        for id in ids {
            let info = connect(cluster.node(*id)).await.queue_stats(queue).await.ok();
            seen.insert(info.and_then(|info| info.served_by));
        }
        if let [Some(leader)] = seen.iter().copied().collect::<Vec<_>>()[..] {
            if ids.contains(&leader) {
                return leader;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no agreed queue leader among {ids:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_serving_node_confirms_nothing_and_steps_down_once_healed() {
    let (mut cluster, links) = start_behind_proxies().await;
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("ledger", replicated).await.unwrap();
    let old = serving_node(&mut cluster, "ledger").await;
    let majority: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let before: Vec<String> = (0..10).map(|n| format!("before {n}")).collect();
    let old_conn = connect(cluster.node(old)).await;
    hopper_tests::publish_all(&old_conn, "ledger", before.clone()).await;
    let mut old_consumer =
        old_conn.consume("ledger", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    let held = hopper_tests::next_delivery(&mut old_consumer).await;
    assert_eq!(hopper_tests::body_text(&held), "before 0");

    isolate(&links, old, true);
    // The cut-off node stops serving: its consumer is cancelled once it has not heard from a
    // majority for its lease.
    let ended = tokio::time::timeout(Duration::from_secs(10), old_consumer.next()).await;
    match ended.expect("the cut-off node cancels its consumer") {
        None | Some(Err(hopper_client::Error::ConsumerCancelled(_))) => {}
        Some(other) => panic!("expected a cancel, got {:?}", other.map(|d| hopper_tests::body_text(&d))),
    }
    // Its publishes are not confirmed while it is cut off.
    let stranded = tokio::spawn({
        let conn = old_conn.clone();
        async move { conn.publish("ledger", "stranded", Default::default()).await }
    });
    // The majority elects a new serving node, which confirms publishes.
    let new = serving_among(&mut cluster, &majority, "ledger").await;
    let during: Vec<String> = (0..10).map(|n| format!("during {n}")).collect();
    hopper_tests::publish_all(&connect(cluster.node(majority[0])).await, "ledger", during.clone()).await;
    assert!(!stranded.is_finished(), "the cut-off node answered a publish: {:?}", stranded.await);

    isolate(&links, old, false);
    // Healed, the cut-off node steps down, and the stranded publish is answered.
    let serving = serving_node(&mut cluster, "ledger").await;
    let stranded = tokio::time::timeout(Duration::from_secs(10), stranded)
        .await
        .expect("the stranded publish is answered once healed")
        .unwrap();
    let status = cluster_status(cluster.node(old)).await.unwrap();
    let group = hopper_broker::cluster::queue_group("ledger", 3);
    assert_eq!(status.queue_leaders[group - 1], Some(serving), "{status:?} (new was {new})");

    // Every confirmed message is there once, and nothing that was not committed.
    let mut expected: Vec<String> = before.iter().chain(&during).cloned().collect();
    if stranded.is_ok() {
        expected.push("stranded".into());
    }
    let conn = connect(cluster.node(serving)).await;
    let mut consumer =
        conn.consume("ledger", ConsumeOptions { prefetch: 100, ..Default::default() }).await.unwrap();
    let delivered = hopper_tests::next_deliveries(&mut consumer, expected.len()).await;
    let mut got: Vec<String> = delivered.iter().map(hopper_tests::body_text).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "stranded publish answered {stranded:?}");
    let held_again = delivered.iter().find(|d| hopper_tests::body_text(d) == "before 0").unwrap();
    assert!(held_again.redelivered, "the message the cut-off node delivered is flagged");
    let stats = conn.queue_stats("ledger").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, expected.len() as u64), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_change_under_load_and_a_replicated_queue_moves_off_the_node_that_leaves() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("stream", replicated).await.unwrap();
    let leaving = serving_node(&mut cluster, "stream").await;
    let staying: Vec<u64> = (1..=3).filter(|id| *id != leaving).collect();
    let addrs: Vec<String> = staying.iter().map(|id| cluster.node(*id).addr().to_string()).collect();
    let recovery = hopper_client::RecoveryOptions {
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
    };
    let client = hopper_client::Recovering::connect(addrs, Default::default(), recovery).await.unwrap();

    // Load: one publisher confirming each message, one consumer acking each.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let mut confirmed = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!("m{}", confirmed.len());
                client.publish("stream", body.clone(), Default::default()).await.unwrap();
                confirmed.push(body);
            }
            confirmed
        }
    });
    let mut consumer =
        client.consume("stream", ConsumeOptions { prefetch: 20, ..Default::default() }).await.unwrap();
    let (delivered_tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let consuming = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let _ = delivered_tx.send(hopper_tests::body_text(&delivery));
            // A delivery from before a lost connection cannot be acked; it comes back.
            let _ = delivery.ack().await;
        }
    });
    let mut seen = BTreeSet::new();
    receive_until(&mut seen, &mut delivered, 50).await;

    // A fourth node joins while the load runs, and holds a copy of the queue.
    let port = free_ports(1)[0];
    let addr = format!("127.0.0.1:{port}");
    let fourth = Broker::start_with(&["--node-id", "4", "--cluster-listen", &addr]);
    connect(cluster.node(staying[0])).await.cluster_add_node(4, &addr).await.unwrap();
    cluster.nodes.push(fourth);
    let fourth = cluster.node(4);
    eventually("the new node holds the queue", Duration::from_secs(10), || async {
        connect(fourth).await.queue_stats("stream").await.is_ok()
    })
    .await;
    let joined = seen.len();
    receive_until(&mut seen, &mut delivered, joined + 50).await;

    // The node serving the queue leaves: another serves it, and the load goes on.
    connect(cluster.node(staying[0])).await.cluster_remove_node(leaving).await.unwrap();
    cluster.node(leaving).kill();
    let members = [staying[0], staying[1], 4];
    let serving = serving_among(&mut cluster, &members, "stream").await;
    let left = seen.len();
    receive_until(&mut seen, &mut delivered, left + 50).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let confirmed = publisher.await.unwrap();
    let missing = |seen: &BTreeSet<String>| confirmed.iter().filter(|body| !seen.contains(*body)).count();
    while missing(&seen) > 0 {
        let body = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
            .await
            .unwrap_or_else(|_| panic!("{} confirmed messages never delivered", missing(&seen)))
            .expect("the consumer runs");
        seen.insert(body);
    }
    consuming.abort();
    // Every remaining member's copy ends up the same: empty once everything is acked.
    for id in members {
        let node = cluster.node(id);
        eventually("every copy is drained", Duration::from_secs(10), || async {
            let stats = connect(node).await.queue_stats("stream").await.unwrap();
            stats.ready + stats.unacked == 0 || id == serving && stats.ready == 0
        })
        .await;
    }
    let status = cluster_status(cluster.node(4)).await.unwrap();
    let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert!(!ids.contains(&leaving) && ids.contains(&4), "{status:?}");
}

/// Adds what the consumer receives to `seen` until it holds `count` distinct bodies.
async fn receive_until(
    seen: &mut BTreeSet<String>,
    delivered: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    count: usize,
) {
    while seen.len() < count {
        let body = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
            .await
            .expect("deliveries go on")
            .expect("the consumer runs");
        seen.insert(body);
    }
}

/// What the checker's consumer saw: each body, and whether any delivery of it after the first
/// came unflagged.
#[derive(Default)]
struct Seen {
    delivered: BTreeMap<String, u64>,
    unflagged_again: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_kills_of_the_serving_node_lose_no_confirmed_message() {
    const KILLS: usize = 30;
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("checked", replicated).await.unwrap();
    let addrs: Vec<String> = (1..=3).map(|id| cluster.node(id).addr().to_string()).collect();
    let recovery = hopper_client::RecoveryOptions {
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    };
    let client = hopper_client::Recovering::connect(addrs, Default::default(), recovery).await.unwrap();

    // The publisher: one message at a time; the confirmed ones are noted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (confirmed_tx, confirmed) = tokio::sync::watch::channel(Vec::<String>::new());
    let publisher = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = format!("c{n}");
                // Refused while no node can confirm it: not confirmed, so not owed.
                if client.publish("checked", body.clone(), Default::default()).await.is_ok() {
                    confirmed_tx.send_modify(|confirmed| confirmed.push(body));
                }
            }
        }
    });
    // The consumer: acks each delivery; the broker may deliver one again only flagged.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let mut consumer =
        client.consume("checked", ConsumeOptions { prefetch: 50, ..Default::default() }).await.unwrap();
    let consuming = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let body = hopper_tests::body_text(&delivery);
                {
                    let mut seen = seen.lock().unwrap();
                    match seen.delivered.insert(body.clone(), delivery.message_id) {
                        Some(first) if !delivery.redelivered => seen
                            .unflagged_again
                            .push(format!("{body} id {} (first {first})", delivery.message_id)),
                        _ => {}
                    }
                }
                let _ = delivery.ack().await;
            }
        }
    });

    let confirmed_count = |confirmed: &tokio::sync::watch::Receiver<Vec<String>>| confirmed.borrow().len();
    for kill in 1..=KILLS {
        let serving = serving_node(&mut cluster, "checked").await;
        cluster.node(serving).kill();
        let before = confirmed_count(&confirmed);
        // Publishing resumes through the survivors.
        let survivors: Vec<u64> = (1..=3).filter(|id| *id != serving).collect();
        serving_among(&mut cluster, &survivors, "checked").await;
        let mut progress = confirmed.clone();
        let resumed = progress.wait_for(|confirmed| confirmed.len() >= before + 5);
        tokio::time::timeout(Duration::from_secs(10), resumed)
            .await
            .unwrap_or_else(|_| panic!("kill {kill} of node {serving}: publishing did not resume"))
            .unwrap();
        // The killed node comes back and knows the serving node before the next kill.
        cluster.node(serving).restart();
        serving_node(&mut cluster, "checked").await;
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.unwrap();
    let confirmed = confirmed.borrow().clone();
    let started = Instant::now();
    loop {
        let missing: Vec<String> = {
            let seen = seen.lock().unwrap();
            confirmed.iter().filter(|body| !seen.delivered.contains_key(*body)).cloned().collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} of {} confirmed messages never delivered: {:?}",
            missing.len(),
            confirmed.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consuming.abort();
    let seen = seen.lock().unwrap();
    assert!(seen.unflagged_again.is_empty(), "delivered again unflagged: {:?}", seen.unflagged_again);
    assert!(confirmed.len() > KILLS * 5, "{} confirmed", confirmed.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_queues_dead_letter_once_into_a_replicated_dead_letter_queue() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    let conn = connect(cluster.node(1)).await;
    conn.declare_queue("failed", replicated.clone()).await.unwrap();
    let limited =
        QueueOptions { dead_letter: Some("failed".into()), max_deliveries: Some(2), ..replicated.clone() };
    conn.declare_queue("work", limited).await.unwrap();
    let expiring = QueueOptions {
        dead_letter: Some("failed".into()),
        message_ttl: Some(Duration::from_millis(200)),
        ..replicated
    };
    conn.declare_queue("short", expiring).await.unwrap();

    // Fails twice on the node serving it, and dies there: once.
    conn.publish("work", "doomed", Default::default()).await.unwrap();
    let serving = serving_node(&mut cluster, "work").await;
    let server = connect(cluster.node(serving)).await;
    let mut consumer =
        server.consume("work", ConsumeOptions { prefetch: 1, ..Default::default() }).await.unwrap();
    for _ in 0..2 {
        hopper_tests::next_delivery(&mut consumer).await.nack(true).await.unwrap();
    }
    // Expires unconsumed; every node's copy expires it, and only the serving node routes it.
    conn.publish("short", "stale", Default::default()).await.unwrap();

    for id in 1..=3 {
        let node = cluster.node(id);
        eventually("both deaths reach the dead-letter queue's copies", Duration::from_secs(10), || async {
            ready_on(node, "failed").await == 2
        })
        .await;
        eventually("the dead messages leave every copy", Duration::from_secs(10), || async {
            let conn = connect(node).await;
            let work = conn.queue_stats("work").await.unwrap();
            let short = conn.queue_stats("short").await.unwrap();
            work.ready + short.ready == 0
        })
        .await;
    }
    let dead_serving = serving_node(&mut cluster, "failed").await;
    let dead_conn = connect(cluster.node(dead_serving)).await;
    let mut dead = dead_conn.consume("failed", ConsumeOptions::default()).await.unwrap();
    let mut deaths: Vec<(String, String, String)> = hopper_tests::next_deliveries(&mut dead, 2)
        .await
        .iter()
        .map(|d| {
            let death = d.last_death().expect("a death record");
            (hopper_tests::body_text(d), death.queue.clone(), death.reason.clone())
        })
        .collect();
    deaths.sort();
    assert_eq!(
        deaths,
        [
            ("doomed".to_string(), "work".to_string(), "delivery_limit".to_string()),
            ("stale".to_string(), "short".to_string(), "expired".to_string())
        ]
    );
    let stats = dead_conn.queue_stats("failed").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 2), "each died once: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_sent_again_with_its_publish_id_enters_a_replicated_queue_once() {
    let mut cluster = Cluster::start(3);
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("once", replicated).await.unwrap();
    for id in [2, 3] {
        let node = cluster.node(id);
        eventually("every node knows the queue", Duration::from_secs(10), || async {
            queue_names(node).await.contains(&"once".to_string())
        })
        .await;
    }
    let with_id = |id| hopper_client::PublishOptions { publish_id: id, ..Default::default() };
    // The same message through two nodes, as a client retrying elsewhere would send it: both
    // are confirmed, one is stored.
    connect(cluster.node(2)).await.publish("once", "first", with_id(42)).await.unwrap();
    connect(cluster.node(3)).await.publish("once", "first", with_id(42)).await.unwrap();
    // Without an id, or with another, every publish is stored.
    let conn = connect(cluster.node(1)).await;
    conn.publish("once", "second", with_id(43)).await.unwrap();
    conn.publish("once", "third", with_id(0)).await.unwrap();
    conn.publish("once", "third", with_id(0)).await.unwrap();

    let serving = serving_node(&mut cluster, "once").await;
    let server = connect(cluster.node(serving)).await;
    let mut consumer = server.consume("once", ConsumeOptions::default()).await.unwrap();
    let bodies: Vec<String> =
        hopper_tests::next_deliveries(&mut consumer, 4).await.iter().map(hopper_tests::body_text).collect();
    assert_eq!(bodies, ["first", "second", "third", "third"]);
    let stats = server.queue_stats("once").await.unwrap();
    assert_eq!((stats.ready, stats.unacked), (0, 4), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_slow_link_neither_holds_up_confirms_nor_unseats_the_leader() {
    let (mut cluster, links) = start_behind_proxies().await;
    cluster.agreed_leader(Duration::from_secs(10)).await;
    let replicated = QueueOptions { replicated: true, ..QueueOptions::default() };
    connect(cluster.node(1)).await.declare_queue("steady", replicated).await.unwrap();
    let serving = serving_node(&mut cluster, "steady").await;
    let slow = (1..=3).find(|id| *id != serving).unwrap();
    // A consumer at the serving node: a new election would cancel it.
    let conn = connect(cluster.node(serving)).await;
    let mut consumer =
        conn.consume("steady", ConsumeOptions { prefetch: 50, ..Default::default() }).await.unwrap();

    // Every byte to and from the slow node takes 300 ms: under the election timeout, so it
    // keeps following; the other two are a majority and confirm without it.
    for ((from, to), proxy) in &links {
        if *from == slow || *to == slow {
            proxy.slow_down(Duration::from_millis(300));
        }
    }
    let bodies: Vec<String> = (0..50).map(|n| format!("steady {n}")).collect();
    hopper_tests::publish_all(&conn, "steady", bodies.clone()).await;
    let got: Vec<String> =
        hopper_tests::next_deliveries(&mut consumer, 50).await.iter().map(hopper_tests::body_text).collect();
    assert_eq!(got, bodies, "delivered in order, by the same consumer: no election cancelled it");
    let slow_node = cluster.node(slow);
    eventually("the slow node's copy catches up", Duration::from_secs(10), || async {
        connect(slow_node).await.queue_stats("steady").await.is_ok_and(|q| q.published_total == 50)
    })
    .await;
    assert_eq!(serving_node(&mut cluster, "steady").await, serving);
}
