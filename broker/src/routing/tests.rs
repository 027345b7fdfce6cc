//! Routing through exchanges: every kind, exchange-to-exchange bindings, alternates, deletes.

use super::*;

fn spec(name: &str, kind: ExchangeKind) -> ExchangeSpec {
    ExchangeSpec { name: name.into(), kind, durable: false, alternate: None }
}

fn to_queue(queue: &str, key: &str) -> Binding {
    Binding { destination: Destination::Queue(queue.into()), key: key.into(), arguments: BTreeMap::new() }
}

fn to_exchange(exchange: &str, key: &str) -> Binding {
    Binding {
        destination: Destination::Exchange(exchange.into()),
        key: key.into(),
        arguments: BTreeMap::new(),
    }
}

fn queues<'a>(topology: &'a Topology, exchange: &str, key: &str) -> Vec<&'a str> {
    let mut queues = topology.route(exchange, key, &HashMap::new()).unwrap().queues;
    queues.sort();
    queues
}

#[test]
fn direct_routes_by_equal_key_and_fanout_to_all() {
    let mut topology = Topology::default();
    topology.declare(spec("logs", ExchangeKind::Direct)).unwrap();
    topology.bind("logs", to_queue("errors", "error")).unwrap();
    topology.bind("logs", to_queue("all", "error")).unwrap();
    topology.bind("logs", to_queue("all", "info")).unwrap();
    assert_eq!(queues(&topology, "logs", "error"), ["all", "errors"]);
    assert_eq!(queues(&topology, "logs", "info"), ["all"]);
    assert!(queues(&topology, "logs", "debug").is_empty());

    topology.declare(spec("news", ExchangeKind::Fanout)).unwrap();
    topology.bind("news", to_queue("a", "ignored")).unwrap();
    topology.bind("news", to_queue("b", "")).unwrap();
    assert_eq!(queues(&topology, "news", "whatever"), ["a", "b"]);
}

#[test]
fn headers_match_all_or_any() {
    let mut topology = Topology::default();
    topology.declare(spec("h", ExchangeKind::Headers)).unwrap();
    let arguments =
        |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let all = Binding {
        destination: Destination::Queue("all".into()),
        key: String::new(),
        arguments: arguments(&[("format", "pdf"), ("type", "report")]),
    };
    let any = Binding {
        destination: Destination::Queue("any".into()),
        key: String::new(),
        arguments: arguments(&[("format", "pdf"), ("type", "log"), ("x-match", "any")]),
    };
    topology.bind("h", all).unwrap();
    topology.bind("h", any).unwrap();
    let route = |pairs: &[(&str, &str)]| {
        let headers = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut queues = topology.route("h", "", &headers).unwrap().queues;
        queues.sort();
        queues
    };
    assert_eq!(route(&[("format", "pdf"), ("type", "report")]), ["all", "any"]);
    assert_eq!(route(&[("format", "pdf")]), ["any"]);
    assert_eq!(route(&[("type", "log")]), ["any"]);
    assert!(route(&[("format", "zip")]).is_empty());
    let bad = Binding { arguments: arguments(&[("x-match", "some")]), ..to_queue("q", "") };
    assert!(matches!(topology.bind("h", bad), Err(TopologyError::Invalid(_))));
}

#[test]
fn exchange_to_exchange_routes_transitively_once_per_queue_and_survives_cycles() {
    let mut topology = Topology::default();
    for name in ["a", "b", "c"] {
        topology.declare(spec(name, ExchangeKind::Fanout)).unwrap();
    }
    topology.bind("a", to_exchange("b", "")).unwrap();
    topology.bind("b", to_exchange("c", "")).unwrap();
    topology.bind("c", to_exchange("a", "")).unwrap();
    topology.bind("a", to_queue("q", "")).unwrap();
    topology.bind("b", to_queue("q", "")).unwrap();
    topology.bind("c", to_queue("r", "")).unwrap();
    assert_eq!(queues(&topology, "a", ""), ["q", "r"]);
    assert_eq!(queues(&topology, "c", ""), ["q", "r"]);
}

#[test]
fn an_alternate_exchange_takes_what_cannot_be_routed() {
    let mut topology = Topology::default();
    topology.declare(spec("unrouted", ExchangeKind::Fanout)).unwrap();
    topology.bind("unrouted", to_queue("lost", "")).unwrap();
    let with_alternate =
        ExchangeSpec { alternate: Some("unrouted".into()), ..spec("orders", ExchangeKind::Direct) };
    topology.declare(with_alternate).unwrap();
    topology.bind("orders", to_queue("paid", "paid")).unwrap();
    let routed = topology.route("orders", "paid", &HashMap::new()).unwrap();
    assert_eq!((routed.queues, routed.by_alternate), (vec!["paid"], false));
    let alternate = topology.route("orders", "refunded", &HashMap::new()).unwrap();
    assert_eq!((alternate.queues, alternate.by_alternate), (vec!["lost"], true));
}

#[test]
fn declares_compare_and_deletes_clean_up() {
    let mut topology = Topology::default();
    assert_eq!(topology.declare(spec("x", ExchangeKind::Topic)), Ok(true));
    assert_eq!(topology.declare(spec("x", ExchangeKind::Topic)), Ok(false));
    assert!(matches!(topology.declare(spec("x", ExchangeKind::Direct)), Err(TopologyError::Different(_))));
    assert!(matches!(topology.declare(spec("", ExchangeKind::Direct)), Err(TopologyError::Invalid(_))));
    topology.declare(spec("y", ExchangeKind::Fanout)).unwrap();
    topology.bind("y", to_exchange("x", "")).unwrap();
    topology.bind("x", to_queue("q", "a.#")).unwrap();
    assert!(matches!(topology.delete("x", true), Err(TopologyError::InUse(_))));
    topology.delete("x", false).unwrap();
    assert!(topology.get("y").unwrap().bindings.is_empty(), "bindings to a deleted exchange go with it");
    topology.bind("y", to_queue("q", "")).unwrap();
    assert_eq!(topology.unbind_destination(&Destination::Queue("q".into())), ["y"]);
    assert!(queues(&topology, "y", "").is_empty());
    assert!(matches!(topology.route("x", "", &HashMap::new()), Err(TopologyError::NoExchange(_))));
}

proptest::proptest! {
    #[test]
    fn seen_names_dedupe_as_a_set_does_on_either_side_of_the_switch(
        names in proptest::collection::vec(0u8..40, 0..80),
    ) {
        let names: Vec<String> = names.iter().map(|n| format!("q{n}")).collect();
        let mut seen = super::Seen::default();
        let mut reference = std::collections::HashSet::new();
        for name in &names {
            proptest::prop_assert_eq!(seen.insert(name), reference.insert(name.as_str()), "{}", name);
        }
    }
}
