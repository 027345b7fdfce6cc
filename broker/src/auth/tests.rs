use std::net::IpAddr;

use super::*;

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

fn remote() -> IpAddr {
    "192.0.2.7".parse().unwrap()
}

#[test]
fn the_built_in_guest_works_from_loopback_only_until_an_admin_exists() {
    let dir = tempfile::tempdir().unwrap();
    let users = Users::open(dir.path()).unwrap();
    assert!(users.default_user_active());
    assert!(users.login_account(DEFAULT_USER, loopback()).unwrap().is_some());
    let refused = users.login_account(DEFAULT_USER, remote()).unwrap_err().to_string();
    assert!(
        refused.contains("only connect from localhost") && refused.contains("hopper user add"),
        "{refused}"
    );
    assert!(users.anonymous(loopback()).is_ok());

    // A user without the admin tag leaves the guest in place, so nobody is locked out.
    users.put("worker", Some("s3cret"), vec![], false).unwrap();
    assert!(users.default_user_active());
    users.put("root", Some("t0p"), vec![ADMIN_TAG.into()], false).unwrap();
    assert!(!users.default_user_active());
    assert!(users.login_account(DEFAULT_USER, loopback()).unwrap().is_none(), "guest is gone");
    assert!(matches!(users.anonymous(loopback()), Err(BrokerError::Unauthenticated(_))));
}

#[test]
fn users_survive_a_reopen_with_verifiers_not_passwords() {
    let dir = tempfile::tempdir().unwrap();
    {
        let users = Users::open(dir.path()).unwrap();
        users.put("alice", Some("wonderland"), vec![ADMIN_TAG.into()], false).unwrap();
        let patterns =
            SavedPermissions { configure: "^$".into(), write: "orders.*".into(), read: ".*".into() };
        users.set_permissions("alice", Permissions::compile(patterns).unwrap()).unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join(USERS_FILE)).unwrap();
    assert!(!text.contains("wonderland"), "the password is never stored");
    let users = Users::open(dir.path()).unwrap();
    let alice = users.login_account("alice", remote()).unwrap().expect("alice is back");
    assert!(alice.verifier.matches("wonderland"));
    assert!(!alice.verifier.matches("Wonderland"));
    assert!(alice.permissions.allows(Access::Write, Resource::Queue("orders.eu")));
    assert!(!alice.permissions.allows(Access::Write, Resource::Queue("billing")));
    assert!(!alice.permissions.allows(Access::Configure, Resource::Queue("orders")));
}

#[test]
fn changes_that_cannot_apply_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let users = Users::open(dir.path()).unwrap();
    users.put("bob", Some("pw"), vec![], false).unwrap();
    assert!(matches!(
        users.put("bob", Some("other"), vec![], false),
        Err(BrokerError::PreconditionFailed(_))
    ));
    assert!(matches!(users.put("carol", None, vec![], true), Err(BrokerError::NotFound(_))));
    assert!(matches!(users.put("", Some("pw"), vec![], false), Err(BrokerError::InvalidArgument(_))));
    assert!(matches!(users.put("dave", Some(""), vec![], false), Err(BrokerError::InvalidArgument(_))));
    assert!(matches!(users.delete("nobody"), Err(BrokerError::NotFound(_))));
    let bad = SavedPermissions { configure: "(".into(), ..Default::default() };
    assert!(matches!(Permissions::compile(bad), Err(BrokerError::InvalidArgument(_))));
    assert!(users.login_account("bob", loopback()).unwrap().unwrap().verifier.matches("pw"));
}

#[test]
fn patterns_match_whole_names_and_empty_matches_nothing() {
    let patterns = SavedPermissions { configure: String::new(), write: "a|b".into(), read: "q-.*".into() };
    let p = Permissions::compile(patterns).unwrap();
    assert!(p.allows(Access::Write, Resource::Queue("a")));
    assert!(!p.allows(Access::Write, Resource::Queue("ab")), "anchored at both ends");
    assert!(p.allows(Access::Read, Resource::Exchange("q-1")));
    assert!(!p.allows(Access::Configure, Resource::Queue("")));
    assert!(!Permissions::none().allows(Access::Read, Resource::Queue("anything")));
    assert!(Permissions::all().allows(Access::Configure, Resource::Exchange("")));
}
