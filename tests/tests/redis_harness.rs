//! The Redis harness itself: a server that stores, stops, comes back on the same port, and hangs
//! when paused; a three-master cluster that agrees and follows redirects.
use std::time::{Duration, Instant};

use aiguard_tests::redis::{RedisCluster, RedisServer, redis_available};

#[test]
fn server_stores_restarts_on_its_port_and_pauses() {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));

    assert_eq!(redis.cli(&["SET", "quota:t1", "42", "EX", "60"]), "OK");
    assert_eq!(redis.cli(&["GET", "quota:t1"]), "42");
    let ttl: u64 = redis.cli(&["TTL", "quota:t1"]).parse().expect("a TTL");
    assert!((1..=60).contains(&ttl), "TTL {ttl}");
    assert_eq!(redis.cli(&["KEYS", "*"]), "quota:t1");
    assert_eq!(redis.cli(&["GET", "missing"]), "", "nil prints as nothing");

    let first_pid = redis.pid().expect("running");
    redis.stop();
    assert_eq!(redis.pid(), None);
    assert!(!redis.answers_ping(Duration::from_millis(200)));

    redis.restart();
    assert_eq!(redis.port(), port, "a restart keeps the port");
    assert_ne!(redis.pid(), Some(first_pid));
    assert_eq!(redis.cli(&["GET", "quota:t1"]), "", "nothing persists");
    assert_eq!(redis.cli(&["SET", "ban:10.0.0.1", "1"]), "OK");

    redis.pause();
    let asked = Instant::now();
    assert!(
        !redis.answers_ping(Duration::from_millis(300)),
        "a paused server answered"
    );
    assert!(asked.elapsed() >= Duration::from_millis(250));
    redis.resume();
    assert!(redis.answers_ping(Duration::from_secs(2)));
    assert_eq!(redis.cli(&["GET", "ban:10.0.0.1"]), "1");

    // Stopping a paused server still ends it promptly.
    redis.pause();
    let stopping = Instant::now();
    redis.stop();
    assert!(stopping.elapsed() < Duration::from_secs(2));
}

#[test]
fn cluster_of_three_masters_agrees_and_redirects() {
    if !redis_available() {
        return;
    }
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for node in cluster.nodes() {
        let info = node.cli(&["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }

    // Enough keys that some hash to slots of the other nodes: `-c` follows the redirects.
    for i in 0..30 {
        let key = format!("limit:tenant{i}");
        assert_eq!(cluster.cli(&["SET", &key, &i.to_string()]), "OK");
    }
    for i in 0..30 {
        let key = format!("limit:tenant{i}");
        assert_eq!(cluster.cli(&["GET", &key]), i.to_string());
    }
    let per_node: Vec<u64> = cluster
        .nodes()
        .iter()
        .map(|node| node.cli(&["DBSIZE"]).parse().expect("a DBSIZE"))
        .collect();
    assert_eq!(per_node.iter().sum::<u64>(), 30, "{per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys on every node: {per_node:?}"
    );
}
