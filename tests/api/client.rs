//! The client against the emulator: every endpoint, per-item results,
//! pagination, batch limits and error classes.

use std::collections::HashSet;
use std::sync::Arc;

use chat_janitor::emulator::{Seed, SeedChannel, SeedFollow};
use chat_janitor::tencent::client::ItemOutcome;
use chat_janitor::tencent::types::FollowType;
use chat_janitor::tencent::{ApiError, ErrorClass, FollowBatch, SubscriberBatch};

use crate::helpers::*;

fn seed_channel(up: &TestUpstream, id: &str, subscribers: Vec<String>) {
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(id, subscribers)],
        ..Seed::default()
    });
}

#[tokio::test]
async fn delete_subscriber_applies_100_and_reports_each() {
    let up = TestUpstream::start().await;
    let members = users("u", 150);
    seed_channel(&up, "@TOA#_news", members.clone());
    let client = up.client();

    let batch = SubscriberBatch::try_from_iter(members[..100].iter().cloned().map(uid)).unwrap();
    let out = client
        .delete_subscriber(&chan("@TOA#_news"), &batch)
        .await
        .unwrap();
    assert_eq!(out.items.len(), 100);
    assert_eq!(out.count(ItemOutcome::Applied), 100);
    assert_eq!(
        up.emulator.subscribers("@TOA#_news").unwrap(),
        members[100..].to_vec()
    );

    // Again: the same accounts are no longer subscribed, so Result 2.
    let out = client
        .delete_subscriber(&chan("@TOA#_news"), &batch)
        .await
        .unwrap();
    assert_eq!(out.count(ItemOutcome::Noop), 100);
}

#[tokio::test]
async fn delete_subscriber_mixed_results_and_unknown_channel() {
    let up = TestUpstream::start().await;
    seed_channel(&up, "@TOA#_news", vec!["a".into(), "b".into()]);
    let client = up.client();
    let batch = SubscriberBatch::try_from_iter(["a", "zz", "b"].map(uid)).unwrap();
    let out = client
        .delete_subscriber(&chan("@TOA#_news"), &batch)
        .await
        .unwrap();
    let kinds: Vec<_> = out.items.iter().map(|(u, o)| (u.as_str(), *o)).collect();
    assert_eq!(
        kinds,
        [
            ("a", ItemOutcome::Applied),
            ("zz", ItemOutcome::Noop),
            ("b", ItemOutcome::Applied)
        ]
    );

    let err = client
        .delete_subscriber(&chan("@TOA#_nope"), &batch)
        .await
        .unwrap_err();
    assert_eq!(err.vendor_code(), Some(130004));
    assert_eq!(err.class(), ErrorClass::Moot);
}

#[tokio::test]
async fn add_subscriber_then_destroy() {
    let up = TestUpstream::start().await;
    seed_channel(&up, "@TOA#_club", vec!["a".into()]);
    let client = up.client();
    let batch = SubscriberBatch::try_from_iter(["a", "b", "c"].map(uid)).unwrap();
    let out = client
        .add_subscriber(&chan("@TOA#_club"), &batch)
        .await
        .unwrap();
    assert_eq!(out.count(ItemOutcome::Noop), 1);
    assert_eq!(out.count(ItemOutcome::Applied), 2);
    assert_eq!(
        up.emulator.subscribers("@TOA#_club").unwrap(),
        ["a", "b", "c"]
    );

    client
        .destroy_official_account(&chan("@TOA#_club"))
        .await
        .unwrap();
    assert!(!up.emulator.channel_exists("@TOA#_club"));
    let err = client
        .destroy_official_account(&chan("@TOA#_club"))
        .await
        .unwrap_err();
    assert_eq!(err.vendor_code(), Some(130004));
    assert_eq!(err.class(), ErrorClass::Moot);
    // Adding to a channel that is gone is not moot: the work cannot be done.
    let err = client
        .add_subscriber(&chan("@TOA#_club"), &batch)
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::BadRequest);
}

#[tokio::test]
async fn get_subscriber_info_pages_450_exactly_once() {
    let up = TestUpstream::start().await;
    let members = users("m", 450);
    seed_channel(&up, "@TOA#_big", members.clone());
    let client = up.client();

    let mut seen = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .get_subscriber_info(&chan("@TOA#_big"), 200, &next)
            .await
            .unwrap();
        pages += 1;
        assert!(page.subscribers.len() <= 200);
        assert_eq!(page.subscriber_num, 450);
        seen.extend(page.subscribers.into_iter().map(|s| s.account));
        if page.next.is_empty() {
            break;
        }
        next = page.next;
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 450);
    let distinct: HashSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 450);
    assert_eq!(seen, members, "in subscribe order");
}

#[tokio::test]
async fn follow_delete_20_works_and_21_cannot_be_built() {
    let up = TestUpstream::start().await;
    let targets = users("t", 21);
    up.emulator.seed(Seed {
        follows: vec![SeedFollow::new("fan", targets.clone())],
        ..Seed::default()
    });
    let client = up.client();

    assert!(FollowBatch::try_from_iter(targets.iter().cloned().map(uid)).is_err());
    let batch = FollowBatch::try_from_iter(targets[..20].iter().cloned().map(uid)).unwrap();
    let out = client.follow_delete(&uid("fan"), &batch).await.unwrap();
    assert_eq!(out.items.len(), 20);
    assert_eq!(out.count(ItemOutcome::Applied), 20);
    assert_eq!(up.emulator.following("fan"), vec![targets[20].clone()]);

    // The listing endpoints see the same graph.
    let page = client
        .follow_get(&uid("fan"), FollowType::Following, "", 100)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].to_account, targets[20]);
    assert!(page.next_cursor.is_empty());
}

#[tokio::test]
async fn wrong_key_is_a_credentials_error() {
    let up = TestUpstream::start().await;
    seed_channel(&up, "@TOA#_news", vec!["a".into()]);
    let client = up.client_with_key("not-the-key");
    let batch = SubscriberBatch::try_from_iter([uid("a")]).unwrap();
    let err = client
        .delete_subscriber(&chan("@TOA#_news"), &batch)
        .await
        .unwrap_err();
    assert_eq!(err.vendor_code(), Some(70009));
    assert_eq!(err.class(), ErrorClass::Credentials);
    assert_eq!(up.emulator.subscribers("@TOA#_news").unwrap(), ["a"]);
}

#[tokio::test]
async fn three_hundred_calls_in_a_second_are_rate_limited() {
    let up = TestUpstream::start().await;
    seed_channel(&up, "@TOA#_news", vec![]);
    let client = Arc::new(up.client());
    let started = std::time::Instant::now();
    let calls = (0..300).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let batch = SubscriberBatch::try_from_iter([uid(format!("x{i}"))]).unwrap();
            client.delete_subscriber(&chan("@TOA#_news"), &batch).await
        })
    });
    let results: Vec<Result<_, ApiError>> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|j| j.unwrap())
        .collect();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let limited: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        limited.len() >= 100,
        "at most 200 of 300 pass: {}",
        limited.len()
    );
    for e in limited {
        assert_eq!(e.vendor_code(), Some(60007));
        assert_eq!(e.class(), ErrorClass::RateLimited);
    }
    let stats = up.emulator.stats();
    assert!(stats.apis["delete_subscriber"].peak_calls_per_second >= 300);
}

#[tokio::test]
async fn an_unreachable_upstream_is_transient() {
    let up = TestUpstream::start().await;
    let client = up.client();
    up.running.stop().await;
    let err = client
        .destroy_official_account(&chan("@TOA#_gone"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.metric_code(), "connect");
}

/// A replica that may not send (its gate says no: it lost the lease, or was
/// frozen) sends nothing, and the caller learns it was not sent.
#[tokio::test]
async fn a_closed_send_gate_sends_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let up = TestUpstream::start().await;
    seed_channel(&up, "@TOA#_gated", users("g", 3));
    let client = up.client();
    let open = Arc::new(AtomicBool::new(false));
    let gate = open.clone();
    client.gate_sends(Box::new(move || gate.load(Ordering::SeqCst)));
    let batch = SubscriberBatch::try_from_iter(users("g", 3).into_iter().map(uid)).unwrap();
    let err = client
        .delete_subscriber(&chan("@TOA#_gated"), &batch)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotSent { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(up.emulator.calls().is_empty(), "nothing reached upstream");
    assert_eq!(up.emulator.subscribers("@TOA#_gated").unwrap().len(), 3);
    open.store(true, Ordering::SeqCst);
    let out = client
        .delete_subscriber(&chan("@TOA#_gated"), &batch)
        .await
        .unwrap();
    assert_eq!(out.count(ItemOutcome::Applied), 3);
}
