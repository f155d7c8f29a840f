//! Mutation events: rows created, updated or deleted, and tables truncated.
//!
//! A transaction's affected rows are grouped per (webhook, operation). A group becomes a
//! notification when it reaches the webhook's `max_rows` (so a huge transaction streams out
//! in chunks and is never held in memory whole) or when the transaction commits. The order in
//! which notifications are emitted, and so their ordinals, depends only on the WAL and the
//! config: a replay of the same transaction yields the same keys and bodies.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use crate::config::{Op, TableName};
use crate::log::{NewNotification, NotificationKey};

/// A webhook's interest in one table, resolved from its event.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Index of the webhook in the config: orders the notifications of a transaction.
    pub webhook: usize,
    pub hook_id: String,
    pub event: String,
    pub ops: Vec<Op>,
    pub max_rows: usize,
}

impl Subscription {
    /// TRUNCATE removes rows without listing them: it reaches events that asked for
    /// `truncate`, and those that asked for `delete`, which would otherwise miss the removal.
    pub fn wants(&self, op: Op) -> bool {
        match op {
            Op::Truncate => self.ops.contains(&Op::Truncate) || self.ops.contains(&Op::Delete),
            op => self.ops.contains(&op),
        }
    }
}

/// What every notification of one transaction shares.
#[derive(Debug, Clone)]
pub struct TxnContext {
    /// The transaction's id (0: none, e.g. a recheck).
    pub xid: u32,
    /// The commit LSN (Begin's final LSN): the first half of every notification key.
    pub lsn: u64,
    pub lsn_text: String,
    pub committed_at: String,
}

#[derive(Serialize)]
struct Body<'a> {
    hook_id: &'a str,
    event: &'a str,
    table: String,
    op: &'a str,
    rows: &'a [Value],
    lsn: &'a str,
    committed_at: &'a str,
}

struct Group {
    table: TableName,
    subscription: Subscription,
    rows: Vec<Value>,
    /// The rows already in `rows`, so a row changed twice in a transaction is listed once.
    seen: HashSet<String>,
    /// TRUNCATE notifications list no rows.
    truncated: bool,
}

/// Groups one transaction's rows into notifications.
#[derive(Default)]
pub struct Grouper {
    groups: BTreeMap<(usize, Op), Group>,
    ordinals: BTreeMap<String, u32>,
    ready: Vec<NewNotification>,
}

impl Grouper {
    /// Adds one affected row.
    pub fn add_row(
        &mut self,
        ctx: &TxnContext,
        table: &TableName,
        subscription: &Subscription,
        op: Op,
        row: Value,
    ) {
        let group = self.group(table, subscription, op);
        if group.seen.insert(row.to_string()) {
            group.rows.push(row);
        }
        if group.rows.len() >= subscription.max_rows {
            self.emit(ctx, (subscription.webhook, op));
        }
    }

    /// Records a TRUNCATE of `table` for a subscription.
    pub fn add_truncate(&mut self, table: &TableName, subscription: &Subscription) {
        self.group(table, subscription, Op::Truncate).truncated = true;
    }

    fn group(&mut self, table: &TableName, subscription: &Subscription, op: Op) -> &mut Group {
        self.groups
            .entry((subscription.webhook, op))
            .or_insert_with(|| Group {
                table: table.clone(),
                subscription: subscription.clone(),
                rows: Vec::new(),
                seen: HashSet::new(),
                truncated: false,
            })
    }

    /// Notifications that are complete before the commit (full groups), to be written early.
    pub fn take_ready(&mut self) -> Vec<NewNotification> {
        std::mem::take(&mut self.ready)
    }

    /// Emits every remaining group, in (webhook, op) order, and returns all notifications
    /// not yet taken, with how many notifications each webhook got in this transaction.
    pub fn finish(mut self, ctx: &TxnContext) -> (Vec<NewNotification>, BTreeMap<String, u32>) {
        let keys: Vec<(usize, Op)> = self.groups.keys().copied().collect();
        for key in keys {
            self.emit(ctx, key);
        }
        (self.ready, self.ordinals)
    }

    fn emit(&mut self, ctx: &TxnContext, key: (usize, Op)) {
        let Some(group) = self.groups.get_mut(&key) else {
            return;
        };
        if group.rows.is_empty() && !group.truncated {
            return;
        }
        let sub = &group.subscription;
        let ordinal = self.ordinals.entry(sub.hook_id.clone()).or_insert(0);
        let body = Body {
            hook_id: &sub.hook_id,
            event: &sub.event,
            table: group.table.to_string(),
            op: key.1.as_str(),
            rows: &group.rows,
            lsn: &ctx.lsn_text,
            committed_at: &ctx.committed_at,
        };
        // Serializing strings and JSON values cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        self.ready.push(NewNotification {
            key: NotificationKey {
                hook: sub.hook_id.clone(),
                lsn: ctx.lsn,
                ordinal: *ordinal,
            },
            body,
        });
        *ordinal += 1;
        group.rows.clear();
        group.seen.clear();
        group.truncated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(webhook: usize, hook: &str, ops: &[Op], max_rows: usize) -> Subscription {
        Subscription {
            webhook,
            hook_id: hook.into(),
            event: "e".into(),
            ops: ops.to_vec(),
            max_rows,
        }
    }

    fn ctx() -> TxnContext {
        TxnContext {
            xid: 0,
            lsn: 0x100,
            lsn_text: "0/100".into(),
            committed_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    fn bodies(v: &[NewNotification]) -> Vec<Value> {
        v.iter()
            .map(|n| serde_json::from_slice(&n.body).expect("json"))
            .collect()
    }

    #[test]
    fn rows_are_grouped_per_op_chunked_and_deduplicated() {
        let table = TableName::parse("public.t").expect("name");
        let s = sub(0, "h", &[Op::Insert, Op::Update], 2);
        let mut g = Grouper::default();
        for id in [1, 2, 3] {
            g.add_row(&ctx(), &table, &s, Op::Insert, Value::from(id));
        }
        g.add_row(&ctx(), &table, &s, Op::Update, Value::from(7));
        g.add_row(&ctx(), &table, &s, Op::Update, Value::from(7));
        let early = g.take_ready();
        assert_eq!(
            early.len(),
            1,
            "the first insert chunk is ready before commit"
        );
        let (rest, ordinals) = g.finish(&ctx());
        let all: Vec<NewNotification> = early.into_iter().chain(rest).collect();
        let b = bodies(&all);
        assert_eq!(b[0]["rows"], serde_json::json!([1, 2]));
        assert_eq!(b[1]["rows"], serde_json::json!([3]));
        assert_eq!(b[1]["op"], "insert");
        assert_eq!(b[2]["rows"], serde_json::json!([7]));
        assert_eq!(b[2]["op"], "update");
        assert_eq!(b[2]["table"], "public.t");
        assert_eq!(b[2]["lsn"], "0/100");
        let ids: Vec<String> = all.iter().map(|n| n.key.to_string()).collect();
        assert_eq!(
            ids,
            vec![
                "h_0000000000000100_0",
                "h_0000000000000100_1",
                "h_0000000000000100_2"
            ]
        );
        assert_eq!(ordinals.get("h"), Some(&3));
    }

    #[test]
    fn truncate_reaches_delete_subscribers_with_no_rows() {
        let table = TableName::parse("t").expect("name");
        let s = sub(0, "h", &[Op::Delete], 10);
        assert!(s.wants(Op::Truncate));
        assert!(!sub(1, "i", &[Op::Insert], 10).wants(Op::Truncate));
        let mut g = Grouper::default();
        g.add_truncate(&table, &s);
        let (out, _) = g.finish(&ctx());
        let b = bodies(&out);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0]["op"], "truncate");
        assert_eq!(b[0]["rows"], serde_json::json!([]));
    }
}
