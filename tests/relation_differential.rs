//! Relation events, differentially (issue 4): a seeded random workload over customers, their
//! contracts (a foreign key) and their tags (a join table), with ground truth from PostgreSQL
//! itself. Before and after every transaction the workload's own connection reads the link
//! sets (and the contracts, for `related_change`); walhook's notifications must equal what
//! they imply exactly, transaction by transaction, also across `kill -9`.
//!
//! ```text
//! customers(id) <── contracts.customer_id   (contracts_customer_id_fkey, ON DELETE CASCADE
//!      ^                                     or SET NULL; default replica identity)
//!      └──────── customer_tags(customer_id, tag) ──> tags(code)
//! ```
//!
//! Every notification is mapped to its transaction by its `lsn`: the workload reads
//! `pg_current_wal_insert_lsn()` right before each transaction and right after its commit, and
//! the commit record lies between the two. Set `RELATIONS_SEED` to replay a workload.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

use crate::support::{signature_ok, Recorded, Scenario};

/// The foreign key every contract event names.
const FKEY: &str = "contracts_customer_id_fkey";

/// The join table the tag event names.
const JOIN: &str = "public.customer_tags";

/// The log line of a process that has connected and started streaming.
const STREAMING: &str = " streaming slot=";

/// How long the tests wait for walhook to catch up with the workload.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Customer ids the workload uses: 1..=CUSTOMERS.
const CUSTOMERS: i64 = 12;
/// Contract ids the workload uses: 1..=CONTRACTS.
const CONTRACTS: i64 = 40;
/// The tags (never deleted: `customer_tags.tag` has no ON DELETE action).
const TAGS: [&str; 4] = ["gold", "beta", "churn risk", "vip"];
/// Transactions per workload.
const TXNS: usize = 150;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Added,
    Removed,
    Related,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Added => "relation_added",
            Op::Removed => "relation_removed",
            Op::Related => "related_change",
        }
    }

    fn parse(text: &str) -> Option<Op> {
        [Op::Added, Op::Removed, Op::Related]
            .into_iter()
            .find(|op| op.name() == text)
    }
}

/// One relation event and the webhook subscribed to it: event `on_{id}`, webhook `{id}` at
/// `{receiver}/hooks/{id}`.
struct Hook {
    id: &'static str,
    table: &'static str,
    relation: &'static str,
    ops: &'static [Op],
    /// `max_rows` in the config; `None` leaves the default (larger than any transaction here).
    max_rows: Option<usize>,
    /// Whether `related` holds text (a tag) rather than an integer key.
    related_is_text: bool,
}

/// Small `max_rows` on some webhooks so that transactions get split.
const HOOKS: [Hook; 4] = [
    Hook {
        id: "customer_contracts",
        table: "public.customers",
        relation: FKEY,
        ops: &[Op::Added, Op::Removed],
        max_rows: Some(3),
        related_is_text: false,
    },
    Hook {
        id: "contract_customer",
        table: "public.contracts",
        relation: FKEY,
        ops: &[Op::Added, Op::Removed],
        max_rows: None,
        related_is_text: false,
    },
    Hook {
        id: "customer_related",
        table: "public.customers",
        relation: FKEY,
        ops: &[Op::Related],
        max_rows: Some(2),
        related_is_text: false,
    },
    Hook {
        id: "customer_tags",
        table: "public.customers",
        relation: JOIN,
        ops: &[Op::Added, Op::Removed],
        max_rows: Some(2),
        related_is_text: true,
    },
];

fn hook_spec(id: &str) -> Option<&'static Hook> {
    HOOKS.iter().find(|h| h.id == id)
}

fn max_rows(hook: &Hook) -> usize {
    hook.max_rows.unwrap_or(walhook::config::DEFAULT_MAX_ROWS)
}

fn config() -> String {
    let mut text = String::new();
    for h in &HOOKS {
        let on: Vec<String> = h
            .ops
            .iter()
            .map(|op| format!("\"{}\"", op.name()))
            .collect();
        text.push_str(&format!(
            "[[event]]\nname = \"on_{}\"\ntable = \"{}\"\nrelation = \"{}\"\non = [{}]\n\n",
            h.id,
            h.table,
            h.relation,
            on.join(", ")
        ));
    }
    for h in &HOOKS {
        let max_rows = h
            .max_rows
            .map_or_else(String::new, |n| format!("max_rows = {n}\n"));
        text.push_str(&format!(
            "[[webhook]]\nid = \"{id}\"\nevent = \"on_{id}\"\nurl = \"{{receiver}}/hooks/{id}\"\nsecret = \"{{secret}}\"\n{max_rows}\n",
            id = h.id
        ));
    }
    text
}

/// What deleting a customer does to its contracts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnDelete {
    Cascade,
    SetNull,
}

impl OnDelete {
    fn sql(self) -> &'static str {
        match self {
            OnDelete::Cascade => "CASCADE",
            OnDelete::SetNull => "SET NULL",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The workload.

/// The generator's model of a contract, only to write valid statements (no duplicate keys, no
/// dangling references, no no-op updates); the ground truth is PostgreSQL's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contract {
    customer: Option<i64>,
    note: String,
}

struct Model {
    on_delete: OnDelete,
    customers: BTreeSet<i64>,
    contracts: BTreeMap<i64, Contract>,
    tagged: BTreeSet<(i64, &'static str)>,
    /// Every note is new: an update that sets a note always changes it.
    notes: u32,
}

impl Model {
    fn note(&mut self) -> String {
        self.notes += 1;
        format!("n{}", self.notes)
    }

    fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> Option<T> {
        (!from.is_empty()).then(|| from[rng.usize(..from.len())])
    }

    fn customer(&self, rng: &mut fastrand::Rng) -> Option<i64> {
        let ids: Vec<i64> = self.customers.iter().copied().collect();
        Self::pick(rng, &ids)
    }

    fn absent_customer(&self, rng: &mut fastrand::Rng) -> Option<i64> {
        let ids: Vec<i64> = (1..=CUSTOMERS)
            .filter(|id| !self.customers.contains(id))
            .collect();
        Self::pick(rng, &ids)
    }

    fn contract(&self, rng: &mut fastrand::Rng) -> Option<i64> {
        let ids: Vec<i64> = self.contracts.keys().copied().collect();
        Self::pick(rng, &ids)
    }

    fn absent_contract(&self, rng: &mut fastrand::Rng) -> Option<i64> {
        let ids: Vec<i64> = (1..=CONTRACTS)
            .filter(|id| !self.contracts.contains_key(id))
            .collect();
        Self::pick(rng, &ids)
    }

    /// A customer for a contract: mostly a present one, sometimes none.
    fn target(&self, rng: &mut fastrand::Rng) -> Option<i64> {
        if rng.u8(..5) == 0 {
            None
        } else {
            self.customer(rng)
        }
    }

    /// A target other than `current` (present customer or NULL), if there is one.
    fn other_target(&self, rng: &mut fastrand::Rng, current: Option<i64>) -> Option<Option<i64>> {
        let mut options: Vec<Option<i64>> = self.customers.iter().map(|c| Some(*c)).collect();
        options.push(None);
        options.retain(|o| *o != current);
        Self::pick(rng, &options)
    }

    fn tag_link(&self, rng: &mut fastrand::Rng) -> Option<(i64, &'static str)> {
        let links: Vec<(i64, &'static str)> = self.tagged.iter().copied().collect();
        Self::pick(rng, &links)
    }

    fn absent_tag_link(&self, rng: &mut fastrand::Rng) -> Option<(i64, &'static str)> {
        let mut links = Vec::new();
        for c in &self.customers {
            for t in TAGS {
                if !self.tagged.contains(&(*c, t)) {
                    links.push((*c, t));
                }
            }
        }
        Self::pick(rng, &links)
    }

    fn delete_customer(&mut self, id: i64) {
        self.customers.remove(&id);
        self.tagged.retain(|(c, _)| *c != id);
        match self.on_delete {
            OnDelete::Cascade => self.contracts.retain(|_, k| k.customer != Some(id)),
            OnDelete::SetNull => {
                for k in self.contracts.values_mut() {
                    if k.customer == Some(id) {
                        k.customer = None;
                    }
                }
            }
        }
    }
}

fn customer_sql(customer: Option<i64>) -> String {
    customer.map_or_else(|| "NULL".to_string(), |c| c.to_string())
}

fn contract_sql(id: i64, k: &Contract) -> String {
    format!("({id}, {}, '{}')", customer_sql(k.customer), k.note)
}

fn point_sql(id: i64, customer: Option<i64>) -> String {
    format!(
        "UPDATE contracts SET customer_id = {} WHERE id = {id};",
        customer_sql(customer)
    )
}

fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One random statement (or a short sequence, e.g. a flip and its flip-back), applied to the
/// model. Empty when the model offers nothing to do it to.
fn statement(rng: &mut fastrand::Rng, m: &mut Model) -> Vec<String> {
    match rng.u8(..20) {
        // Insert one to three contracts.
        0..=2 => {
            let mut values = Vec::new();
            for _ in 0..rng.usize(1..=3) {
                let Some(id) = m.absent_contract(rng) else {
                    break;
                };
                let k = Contract {
                    customer: m.target(rng),
                    note: m.note(),
                };
                values.push(contract_sql(id, &k));
                m.contracts.insert(id, k);
            }
            if values.is_empty() {
                return Vec::new();
            }
            vec![format!(
                "INSERT INTO contracts VALUES {};",
                values.join(", ")
            )]
        }
        // Delete one or two contracts.
        3 => {
            let mut ids = Vec::new();
            for _ in 0..rng.usize(1..=2) {
                if let Some(id) = m.contract(rng) {
                    m.contracts.remove(&id);
                    ids.push(id);
                }
            }
            if ids.is_empty() {
                return Vec::new();
            }
            vec![format!(
                "DELETE FROM contracts WHERE id IN ({});",
                id_list(&ids)
            )]
        }
        // Re-point one contract: a→b, value→NULL, NULL→value.
        4..=6 => {
            let Some(id) = m.contract(rng) else {
                return Vec::new();
            };
            let Some(to) = m.other_target(rng, m.contracts[&id].customer) else {
                return Vec::new();
            };
            m.contracts.get_mut(&id).expect("present").customer = to;
            vec![point_sql(id, to)]
        }
        // Only the note: the link stays, the contract changes.
        7 => {
            let Some(id) = m.contract(rng) else {
                return Vec::new();
            };
            let note = m.note();
            m.contracts.get_mut(&id).expect("present").note = note.clone();
            vec![format!(
                "UPDATE contracts SET note = '{note}' WHERE id = {id};"
            )]
        }
        // Every contract of one customer (or every unlinked one) at once: many links, so
        // notifications get split at max_rows.
        8 => {
            let from = if rng.u8(..3) == 0 {
                None
            } else {
                m.customer(rng)
            };
            let Some(to) = m.other_target(rng, from) else {
                return Vec::new();
            };
            for k in m.contracts.values_mut() {
                if k.customer == from {
                    k.customer = to;
                }
            }
            let filter = from.map_or_else(
                || "customer_id IS NULL".to_string(),
                |c| format!("customer_id = {c}"),
            );
            vec![format!(
                "UPDATE contracts SET customer_id = {} WHERE {filter};",
                customer_sql(to)
            )]
        }
        // Flip-backs and other sequences whose parts cancel out, or partly.
        9..=11 => {
            let Some(id) = m.contract(rng) else {
                return Vec::new();
            };
            let old = m.contracts[&id].clone();
            match rng.u8(..5) {
                // a→b→a: no link change, no contract change.
                0 => {
                    let Some(to) = m.other_target(rng, old.customer) else {
                        return Vec::new();
                    };
                    vec![point_sql(id, to), point_sql(id, old.customer)]
                }
                // a→b→a with a new note on the way: the contract changed, its link did not.
                1 => {
                    let Some(to) = m.other_target(rng, old.customer) else {
                        return Vec::new();
                    };
                    let note = m.note();
                    m.contracts.get_mut(&id).expect("present").note = note.clone();
                    vec![
                        format!(
                            "UPDATE contracts SET customer_id = {}, note = '{note}' WHERE id = {id};",
                            customer_sql(to)
                        ),
                        point_sql(id, old.customer),
                    ]
                }
                // Deleted and inserted again as it was.
                2 => vec![
                    format!("DELETE FROM contracts WHERE id = {id};"),
                    format!("INSERT INTO contracts VALUES {};", contract_sql(id, &old)),
                ],
                // Deleted and inserted again pointing elsewhere: a re-point.
                3 => {
                    let Some(to) = m.other_target(rng, old.customer) else {
                        return Vec::new();
                    };
                    let k = Contract {
                        customer: to,
                        note: old.note.clone(),
                    };
                    let sql = vec![
                        format!("DELETE FROM contracts WHERE id = {id};"),
                        format!("INSERT INTO contracts VALUES {};", contract_sql(id, &k)),
                    ];
                    m.contracts.insert(id, k);
                    sql
                }
                // A contract that lives only inside the transaction, re-pointed on the way.
                _ => {
                    let Some(new) = m.absent_contract(rng) else {
                        return Vec::new();
                    };
                    let k = Contract {
                        customer: m.target(rng),
                        note: m.note(),
                    };
                    let to = m.other_target(rng, k.customer).unwrap_or(k.customer);
                    vec![
                        format!("INSERT INTO contracts VALUES {};", contract_sql(new, &k)),
                        point_sql(new, to),
                        format!("DELETE FROM contracts WHERE id = {new};"),
                    ]
                }
            }
        }
        // A contract's own key changes: one link goes, another comes.
        12 => {
            let (Some(from), Some(to)) = (m.contract(rng), m.absent_contract(rng)) else {
                return Vec::new();
            };
            let k = m.contracts.remove(&from).expect("present");
            m.contracts.insert(to, k);
            vec![format!("UPDATE contracts SET id = {to} WHERE id = {from};")]
        }
        // Tag one to three customers.
        13 | 14 => {
            let mut values = Vec::new();
            for _ in 0..rng.usize(1..=3) {
                let Some((c, t)) = m.absent_tag_link(rng) else {
                    break;
                };
                m.tagged.insert((c, t));
                values.push(format!("({c}, '{t}')"));
            }
            if values.is_empty() {
                return Vec::new();
            }
            vec![format!(
                "INSERT INTO customer_tags VALUES {};",
                values.join(", ")
            )]
        }
        // Untag: one link, or a tag from everyone.
        15 => {
            if rng.bool() {
                let t = TAGS[rng.usize(..TAGS.len())];
                m.tagged.retain(|(_, tag)| *tag != t);
                vec![format!("DELETE FROM customer_tags WHERE tag = '{t}';")]
            } else {
                let Some((c, t)) = m.tag_link(rng) else {
                    return Vec::new();
                };
                m.tagged.remove(&(c, t));
                vec![format!(
                    "DELETE FROM customer_tags WHERE customer_id = {c} AND tag = '{t}';"
                )]
            }
        }
        // Tag flip-backs, and a join row whose key changes.
        16 => match rng.u8(..3) {
            0 => {
                let Some((c, t)) = m.tag_link(rng) else {
                    return Vec::new();
                };
                vec![
                    format!("DELETE FROM customer_tags WHERE customer_id = {c} AND tag = '{t}';"),
                    format!("INSERT INTO customer_tags VALUES ({c}, '{t}');"),
                ]
            }
            1 => {
                let Some((c, t)) = m.absent_tag_link(rng) else {
                    return Vec::new();
                };
                vec![
                    format!("INSERT INTO customer_tags VALUES ({c}, '{t}');"),
                    format!("DELETE FROM customer_tags WHERE customer_id = {c} AND tag = '{t}';"),
                ]
            }
            _ => {
                let (Some((c, t)), Some((c2, t2))) = (m.tag_link(rng), m.absent_tag_link(rng))
                else {
                    return Vec::new();
                };
                m.tagged.remove(&(c, t));
                m.tagged.insert((c2, t2));
                vec![format!(
                    "UPDATE customer_tags SET customer_id = {c2}, tag = '{t2}' \
                     WHERE customer_id = {c} AND tag = '{t}';"
                )]
            }
        },
        // Delete a customer: its tags go (CASCADE), its contracts go or lose it. Sometimes
        // the id comes back at once, with no links.
        17 | 18 => {
            let Some(id) = m.customer(rng) else {
                return Vec::new();
            };
            m.delete_customer(id);
            let mut sql = vec![format!("DELETE FROM customers WHERE id = {id};")];
            if rng.u8(..4) == 0 {
                m.customers.insert(id);
                sql.push(format!("INSERT INTO customers VALUES ({id});"));
            }
            sql
        }
        // Insert one or two customers.
        _ => {
            let mut ids = Vec::new();
            for _ in 0..rng.usize(1..=2) {
                if let Some(id) = m.absent_customer(rng) {
                    m.customers.insert(id);
                    ids.push(format!("({id})"));
                }
            }
            if ids.is_empty() {
                return Vec::new();
            }
            vec![format!("INSERT INTO customers VALUES {};", ids.join(", "))]
        }
    }
}

struct Workload {
    /// Creates the tables and the rows that exist before walhook first runs.
    setup: String,
    /// Each a whole transaction: BEGIN; ...; COMMIT;
    txns: Vec<String>,
}

fn workload(seed: u64, on_delete: OnDelete) -> Workload {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut m = Model {
        on_delete,
        customers: BTreeSet::new(),
        contracts: BTreeMap::new(),
        tagged: BTreeSet::new(),
        notes: 0,
    };
    for id in 1..=CUSTOMERS {
        if rng.u8(..3) < 2 {
            m.customers.insert(id);
        }
    }
    for id in 1..=CONTRACTS {
        if rng.u8(..3) < 2 {
            let k = Contract {
                customer: m.target(&mut rng),
                note: m.note(),
            };
            m.contracts.insert(id, k);
        }
    }
    for _ in 0..15 {
        if let Some(link) = m.absent_tag_link(&mut rng) {
            m.tagged.insert(link);
        }
    }
    let mut setup = format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY);
CREATE TABLE contracts (id bigint PRIMARY KEY,
                        customer_id bigint REFERENCES customers ON DELETE {},
                        note text);
CREATE TABLE tags (code text PRIMARY KEY);
CREATE TABLE customer_tags (customer_id bigint REFERENCES customers ON DELETE CASCADE,
                            tag text REFERENCES tags, PRIMARY KEY (customer_id, tag));
",
        on_delete.sql()
    );
    let tags: Vec<String> = TAGS.iter().map(|t| format!("('{t}')")).collect();
    let customers: Vec<String> = m.customers.iter().map(|c| format!("({c})")).collect();
    let contracts: Vec<String> = m
        .contracts
        .iter()
        .map(|(id, k)| contract_sql(*id, k))
        .collect();
    let tagged: Vec<String> = m
        .tagged
        .iter()
        .map(|(c, t)| format!("({c}, '{t}')"))
        .collect();
    for (table, values) in [
        ("tags", tags),
        ("customers", customers),
        ("contracts", contracts),
        ("customer_tags", tagged),
    ] {
        if !values.is_empty() {
            setup.push_str(&format!(
                "INSERT INTO {table} VALUES {};\n",
                values.join(", ")
            ));
        }
    }
    let txns = (0..TXNS)
        .map(|_| {
            let mut stmts = Vec::new();
            for _ in 0..rng.usize(1..=4) {
                stmts.extend(statement(&mut rng, &mut m));
            }
            format!("BEGIN;\n{}\nCOMMIT;", stmts.join("\n"))
        })
        .collect();
    Workload { setup, txns }
}

// ---------------------------------------------------------------------------------------------
// Ground truth.

/// A link or, for related_change, a row: (row, related), each as its JSON text (`7`,
/// `"gold"`), so that a key sent with the wrong JSON type does not compare equal.
type Link = (String, Option<String>);

fn int(v: i64) -> String {
    Value::from(v).to_string()
}

fn text(v: &str) -> String {
    Value::from(v).to_string()
}

/// What the workload's connection reads between transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    /// id → (customer_id, note, xmin): the xmin tells a row the transaction wrote (even with
    /// the values it had) from one it left alone.
    contracts: BTreeMap<i64, (Option<i64>, Option<String>, String)>,
    /// (contract id, customer id)
    contract_links: BTreeSet<(i64, i64)>,
    /// (customer id, tag)
    tag_links: BTreeSet<(i64, String)>,
}

async fn snapshot(client: &Client) -> Snapshot {
    let query = |sql: &'static str| async move {
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    };
    let contracts = query("SELECT id, customer_id, note, xmin::text FROM contracts")
        .await
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let contract_links =
        query("SELECT id, customer_id FROM contracts WHERE customer_id IS NOT NULL")
            .await
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let tag_links = query("SELECT customer_id, tag FROM customer_tags")
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Snapshot {
        contracts,
        contract_links,
        tag_links,
    }
}

/// `0/16B3748` → a comparable number.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .split_once('/')
        .unwrap_or_else(|| panic!("LSN {text:?} has no '/'"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|_| panic!("LSN {text:?}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|_| panic!("LSN {text:?}"));
    (hi << 32) | lo
}

async fn insert_lsn(client: &Client) -> u64 {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("read the WAL insert position");
    parse_lsn(&row.get::<_, String>(0))
}

/// What walhook must send for one transaction, per (webhook, op).
type Expected = BTreeMap<(&'static str, Op), BTreeSet<Link>>;

/// One workload transaction and the notifications its before/after link sets imply.
struct Txn {
    sql: String,
    /// The WAL insert position before BEGIN and after COMMIT: its commit LSN is in
    /// (`from`, `to`].
    from: u64,
    to: u64,
    expected: Expected,
}

fn expected_of(before: &Snapshot, after: &Snapshot) -> Expected {
    let mut e: Expected = BTreeMap::new();
    let mut add = |hook: &'static str, op: Op, link: Link| {
        e.entry((hook, op)).or_default().insert(link);
    };
    for (op, links) in [
        (
            Op::Removed,
            before.contract_links.difference(&after.contract_links),
        ),
        (
            Op::Added,
            after.contract_links.difference(&before.contract_links),
        ),
    ] {
        for (contract, customer) in links {
            add(
                "contract_customer",
                op,
                (int(*contract), Some(int(*customer))),
            );
            add(
                "customer_contracts",
                op,
                (int(*customer), Some(int(*contract))),
            );
        }
    }
    for (op, links) in [
        (Op::Removed, before.tag_links.difference(&after.tag_links)),
        (Op::Added, after.tag_links.difference(&before.tag_links)),
    ] {
        for (customer, tag) in links {
            add("customer_tags", op, (int(*customer), Some(text(tag))));
        }
    }
    // A contract changed when its (customer_id, note) differs, or it came or went; it counts
    // for the customers it pointed to before and after: every contract the transaction
    // wrote (inserted, updated, deleted; a new xmin), even when it ends as it began (a→b→a,
    // deleted and inserted again as it was), but not one inserted and deleted within it
    // (it never existed outside the transaction).
    let ids: BTreeSet<i64> = before
        .contracts
        .keys()
        .chain(after.contracts.keys())
        .copied()
        .collect();
    for id in ids {
        let (was, is) = (before.contracts.get(&id), after.contracts.get(&id));
        if was == is {
            continue;
        }
        for (customer, _, _) in was.into_iter().chain(is) {
            if let Some(c) = customer {
                add("customer_related", Op::Related, (int(*c), None));
            }
        }
    }
    e
}

/// Commits `txns` in order on a connection of its own, `pace` apart, and returns the link
/// sets before the first and, per transaction, what it must cause.
async fn run_workload(url: String, txns: Vec<String>, pace: Duration) -> (Snapshot, Vec<Txn>) {
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect for the workload");
    // Drives the connection; ends with the client.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let initial = snapshot(&client).await;
    let mut last = initial.clone();
    let mut out = Vec::new();
    for (n, sql) in txns.into_iter().enumerate() {
        let before = snapshot(&client).await;
        assert_eq!(
            before, last,
            "someone else changed the tables between transactions"
        );
        let from = insert_lsn(&client).await;
        if let Err(e) = client.batch_execute(&sql).await {
            panic!("workload transaction {n} failed: {e:?}\n{sql}");
        }
        let to = insert_lsn(&client).await;
        let after = snapshot(&client).await;
        out.push(Txn {
            expected: expected_of(&before, &after),
            sql,
            from,
            to,
        });
        last = after;
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    (initial, out)
}

/// The ground truth should exercise every kind of change, or some webhooks prove little.
fn assert_truth_covers_everything(initial: &Snapshot, txns: &[Txn]) {
    let mut kinds: BTreeSet<(&str, Op)> = BTreeSet::new();
    let mut repointed = false;
    let mut split = false;
    let mut baselined_removed = false;
    let baseline: BTreeSet<Link> = initial
        .contract_links
        .iter()
        .map(|(k, c)| (int(*k), Some(int(*c))))
        .collect();
    let mut added_since: BTreeSet<Link> = BTreeSet::new();
    for t in txns {
        for ((hook, op), links) in &t.expected {
            kinds.insert((hook, *op));
            let spec = hook_spec(hook).expect("a known hook");
            split |= links.len() > max_rows(spec);
        }
        let removed = t.expected.get(&("contract_customer", Op::Removed));
        let added = t.expected.get(&("contract_customer", Op::Added));
        if let (Some(removed), Some(added)) = (removed, added) {
            let rows = |s: &BTreeSet<Link>| s.iter().map(|l| l.0.clone()).collect::<BTreeSet<_>>();
            repointed |= !rows(removed).is_disjoint(&rows(added));
        }
        if let Some(removed) = removed {
            baselined_removed |= removed
                .iter()
                .any(|l| baseline.contains(l) && !added_since.contains(l));
        }
        if let Some(added) = added {
            added_since.extend(added.iter().cloned());
        }
    }
    for h in &HOOKS {
        for op in h.ops {
            assert!(
                kinds.contains(&(h.id, *op)),
                "the workload never causes {} for {}; the test would prove little",
                op.name(),
                h.id
            );
        }
    }
    assert!(
        repointed,
        "the workload never re-points a contract in one transaction"
    );
    assert!(
        split,
        "no transaction has more links than a webhook's max_rows"
    );
    assert!(
        baselined_removed,
        "the workload never removes a link that existed before walhook started"
    );
}

// ---------------------------------------------------------------------------------------------
// What walhook sent.

/// One relation notification (one distinct webhook-id).
#[derive(Clone, Debug)]
struct Note {
    hook: &'static str,
    op: Op,
    lsn: u64,
    /// Links as sent; for related_change, the rows with no related end.
    links: Vec<Link>,
}

/// Every request as a notification, one per distinct webhook-id. Checks on the way that every
/// request is signed, that every request carrying an id carries the same body byte for byte
/// (retries and replays), and the body's shape (see [`parse_note`]).
fn notes(requests: &[Recorded]) -> Vec<Note> {
    let mut first: BTreeMap<String, &Recorded> = BTreeMap::new();
    for r in requests {
        assert!(signature_ok(r), "bad signature on {r}");
        let id = r
            .header("webhook-id")
            .unwrap_or_else(|| panic!("no webhook-id header on {r}"))
            .to_string();
        match first.get(&id) {
            Some(earlier) => assert_eq!(
                earlier.body, r.body,
                "webhook-id {id} was sent with two different bodies:\n{earlier}\n{r}"
            ),
            None => {
                first.insert(id, r);
            }
        }
    }
    first.into_values().map(parse_note).collect()
}

/// A key of either end as its JSON text; integer keys must be JSON integers, tags strings.
fn key_text(r: &Recorded, v: &Value, is_text: bool) -> String {
    let ok = if is_text { v.is_string() } else { v.is_i64() };
    assert!(
        ok,
        "key {v} is not a JSON {} in {r}",
        if is_text { "string" } else { "integer" }
    );
    v.to_string()
}

/// Checks the body: hook_id (matching the url), event, table, op (one the webhook asked
/// for), relation, lsn, committed_at; `links` for relation_added/removed, each {row, related},
/// with `rows` their rows once each in order; no `links` for related_change and rows listed
/// once; never more than the webhook's max_rows.
fn parse_note(r: &Recorded) -> Note {
    let body = r.json();
    let hook_id = body["hook_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no hook_id in {r}"));
    let hook = hook_spec(hook_id).unwrap_or_else(|| panic!("unknown hook_id in {r}"));
    assert_eq!(r.path, format!("/hooks/{}", hook.id), "hook_id vs url: {r}");
    assert_eq!(body["event"], format!("on_{}", hook.id), "{r}");
    assert_eq!(body["table"], hook.table, "{r}");
    assert_eq!(body["relation"], hook.relation, "{r}");
    let op = body["op"]
        .as_str()
        .and_then(Op::parse)
        .unwrap_or_else(|| panic!("op is not a relation op in {r}"));
    assert!(
        hook.ops.contains(&op),
        "{} did not ask for {}: {r}",
        hook.id,
        op.name()
    );
    assert!(
        body["committed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "committed_at: {r}"
    );
    let lsn = parse_lsn(
        body["lsn"]
            .as_str()
            .unwrap_or_else(|| panic!("no lsn in {r}")),
    );
    let rows: Vec<String> = body["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows array in {r}"))
        .iter()
        .map(|v| key_text(r, v, false))
        .collect();
    assert!(!rows.is_empty(), "a notification without rows: {r}");
    let links: Vec<Link> = if op == Op::Related {
        assert!(
            body.get("links").is_none(),
            "related_change with links: {r}"
        );
        let distinct: BTreeSet<&String> = rows.iter().collect();
        assert_eq!(distinct.len(), rows.len(), "a row listed twice: {r}");
        rows.iter().map(|row| (row.clone(), None)).collect()
    } else {
        let links: Vec<Link> = body["links"]
            .as_array()
            .unwrap_or_else(|| panic!("no links array in {r}"))
            .iter()
            .map(|l| {
                let fields = l
                    .as_object()
                    .unwrap_or_else(|| panic!("link {l} is not an object in {r}"));
                assert_eq!(
                    fields.len(),
                    2,
                    "link {l} has other fields than row and related: {r}"
                );
                (
                    key_text(r, &l["row"], false),
                    Some(key_text(r, &l["related"], hook.related_is_text)),
                )
            })
            .collect();
        let mut link_rows: Vec<String> = Vec::new();
        for (row, _) in &links {
            if !link_rows.contains(row) {
                link_rows.push(row.clone());
            }
        }
        assert_eq!(rows, link_rows, "rows vs the links' rows: {r}");
        links
    };
    assert!(
        links.len() <= max_rows(hook),
        "more than max_rows = {} links/rows: {r}",
        max_rows(hook)
    );
    Note {
        hook: hook.id,
        op,
        lsn,
        links,
    }
}

/// Links (rows for related_change) expected per webhook over the whole workload.
fn expected_totals(txns: &[Txn]) -> BTreeMap<&'static str, usize> {
    let mut totals: BTreeMap<&str, usize> = HOOKS.iter().map(|h| (h.id, 0)).collect();
    for t in txns {
        for ((hook, _), links) in &t.expected {
            *totals.entry(hook).or_insert(0) += links.len();
        }
    }
    totals
}

/// Waits until every webhook received (by distinct webhook-id) at least as many links as
/// ground truth predicts and nothing new arrived for a second, or `SETTLE_TIMEOUT` passed;
/// returns what arrived either way (the comparison explains).
async fn settle_on_truth(s: &Scenario, txns: &[Txn]) -> Vec<Note> {
    let expected = expected_totals(txns);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut seen = usize::MAX;
    let mut stable_since = Instant::now();
    loop {
        let requests = s.receiver.requests();
        if requests.len() != seen {
            seen = requests.len();
            stable_since = Instant::now();
        }
        let notes = notes(&requests);
        let mut got: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &notes {
            *got.entry(n.hook).or_insert(0) += n.links.len();
        }
        let reached = expected
            .iter()
            .all(|(hook, want)| got.get(hook).copied().unwrap_or(0) >= *want);
        if reached && stable_since.elapsed() >= Duration::from_secs(1) {
            return notes;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "not settled after {SETTLE_TIMEOUT:?}: expected links per webhook {expected:?}, got {got:?}"
            );
            return notes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn show(link: &Link) -> String {
    match &link.1 {
        Some(related) => format!("{}>{related}", link.0),
        None => link.0.clone(),
    }
}

/// Lists what `want` has and `got` lacks ("missing") and the reverse ("extra").
fn multiset_diff(
    want: &BTreeMap<Link, usize>,
    got: &BTreeMap<Link, usize>,
) -> (Vec<String>, Vec<String>) {
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    for k in want.keys().chain(got.keys()).collect::<BTreeSet<_>>() {
        let (w, g) = (
            want.get(k).copied().unwrap_or(0),
            got.get(k).copied().unwrap_or(0),
        );
        if w > g {
            missing.push(format!("{} ×{}", show(k), w - g));
        }
        if g > w {
            extra.push(format!("{} ×{}", show(k), g - w));
        }
    }
    (missing, extra)
}

fn counted<'a>(links: impl IntoIterator<Item = &'a Link>) -> BTreeMap<Link, usize> {
    let mut out = BTreeMap::new();
    for l in links {
        *out.entry(l.clone()).or_insert(0) += 1;
    }
    out
}

/// walhook's notifications (deduplicated by webhook-id) against ground truth:
/// - per webhook and op, the multiset of links (rows for related_change) over the whole
///   workload equals ground truth's;
/// - every notification's lsn falls into one workload transaction (none from the silent
///   baseline), all of one transaction's notifications carry one lsn, and per transaction,
///   webhook and op the links equal ground truth's exactly, in as few notifications as
///   max_rows allows.
fn assert_matches_truth(notes: &[Note], txns: &[Txn]) {
    let mut problems: Vec<String> = Vec::new();

    for h in &HOOKS {
        for op in h.ops {
            let want = counted(
                txns.iter()
                    .filter_map(|t| t.expected.get(&(h.id, *op)))
                    .flatten(),
            );
            let got = counted(
                notes
                    .iter()
                    .filter(|n| n.hook == h.id && n.op == *op)
                    .flat_map(|n| &n.links),
            );
            if got != want {
                let (missing, extra) = multiset_diff(&want, &got);
                problems.push(format!(
                    "webhook {} {}: {} expected, {} received over the workload\n  missing: {missing:?}\n  extra: {extra:?}",
                    h.id,
                    op.name(),
                    want.values().sum::<usize>(),
                    got.values().sum::<usize>()
                ));
            }
        }
    }

    // Per transaction, found by lsn.
    let mut by_txn: BTreeMap<usize, Vec<&Note>> = BTreeMap::new();
    for n in notes {
        let at = txns.partition_point(|t| t.to < n.lsn);
        if at < txns.len() && txns[at].from < n.lsn {
            by_txn.entry(at).or_default().push(n);
        } else {
            problems.push(format!(
                "{} {} {:?} at lsn {:X}: in no workload transaction",
                n.hook,
                n.op.name(),
                n.links.iter().map(show).collect::<Vec<_>>(),
                n.lsn
            ));
        }
    }
    let mut bad_txns: BTreeSet<usize> = BTreeSet::new();
    for (i, t) in txns.iter().enumerate() {
        let got_notes = by_txn.get(&i).cloned().unwrap_or_default();
        let lsns: BTreeSet<u64> = got_notes.iter().map(|n| n.lsn).collect();
        if lsns.len() > 1 {
            problems.push(format!(
                "transaction {i}: notifications at several lsns {lsns:X?}"
            ));
            bad_txns.insert(i);
        }
        let keys: BTreeSet<(&str, Op)> = t
            .expected
            .keys()
            .copied()
            .chain(got_notes.iter().map(|n| (n.hook, n.op)))
            .collect();
        for (hook, op) in keys {
            let want = counted(t.expected.get(&(hook, op)).into_iter().flatten());
            let group: Vec<&&Note> = got_notes
                .iter()
                .filter(|n| n.hook == hook && n.op == op)
                .collect();
            let got = counted(group.iter().flat_map(|n| &n.links));
            if got != want {
                let (missing, extra) = multiset_diff(&want, &got);
                problems.push(format!(
                    "transaction {i}, {hook} {}: missing {missing:?}, extra {extra:?}",
                    op.name()
                ));
                bad_txns.insert(i);
                continue;
            }
            let max = max_rows(hook_spec(hook).expect("a known hook"));
            let fewest = want.len().div_ceil(max);
            if group.len() != fewest {
                problems.push(format!(
                    "transaction {i}, {hook} {}: {} links in {} notifications, max_rows {max} needs {fewest}",
                    op.name(),
                    want.len(),
                    group.len()
                ));
                bad_txns.insert(i);
            }
        }
    }

    if !problems.is_empty() {
        let shown: Vec<String> = bad_txns
            .iter()
            .take(8)
            .map(|i| format!("--- transaction {i} ---\n{}", txns[*i].sql))
            .collect();
        panic!(
            "{} problem(s) against the ground truth ({} transactions, {} notifications):\n{}\n\
             the first transactions with problems:\n{}",
            problems.len(),
            txns.len(),
            notes.len(),
            problems.join("\n"),
            shown.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relation_events_equal_ground_truth() {
    let seed = crate::support::seed("RELATIONS_SEED");
    eprintln!("workload seed {seed} (RELATIONS_SEED={seed} replays it), ON DELETE CASCADE");
    let w = workload(seed, OnDelete::Cascade);
    let s = Scenario::new(&w.setup, &config()).await;
    let _walhook = s.start_walhook().await;
    // As fast as it goes: walhook lags behind, and must still see every transaction's links.
    let (initial, txns) = run_workload(s.pg.url(), w.txns, Duration::ZERO).await;
    assert_truth_covers_everything(&initial, &txns);
    eprintln!(
        "ground truth: {:?} links per webhook",
        expected_totals(&txns)
    );
    let notes = settle_on_truth(&s, &txns).await;
    assert_matches_truth(&notes, &txns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relation_events_survive_kill9() {
    let seed = crate::support::seed("RELATIONS_SEED");
    eprintln!("workload seed {seed} (RELATIONS_SEED={seed} replays it), ON DELETE SET NULL");
    let w = workload(seed, OnDelete::SetNull);
    let s = Scenario::new(&w.setup, &config()).await;
    let mut walhook = s.start_walhook().await;
    let load = tokio::spawn(run_workload(s.pg.url(), w.txns, Duration::from_millis(10)));
    let mut rng = fastrand::Rng::with_seed(seed.rotate_left(17) ^ 0x5eed);
    let mut kills_under_load = 0;
    for k in 1..=2 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..900))).await;
        if !load.is_finished() {
            kills_under_load += 1;
        }
        // SIGKILL, then the same arguments and data dir again.
        walhook.restart();
        // The next kill hits a process that streams again, not one still starting.
        walhook.wait_log_count(STREAMING, k + 1).await;
    }
    let (initial, txns) = load.await.expect("workload task");
    assert!(
        kills_under_load >= 1,
        "the workload ended before the first kill; the test would prove little"
    );
    assert_truth_covers_everything(&initial, &txns);
    eprintln!(
        "ground truth: {:?} links per webhook; {kills_under_load} kill(s) under load",
        expected_totals(&txns)
    );
    // Duplicates are allowed only under one webhook-id with one body (checked by `notes`).
    let notes = settle_on_truth(&s, &txns).await;
    let requests = s.receiver.requests().len();
    eprintln!("{requests} requests, {} distinct webhook-ids", notes.len());
    assert_matches_truth(&notes, &txns);
}
