//! Classifications: boolean properties of rows, each defined by a SQL file
//! ([`definition`]), checked against the database here.
//!
//! Checking asks PostgreSQL itself: the table must exist with a primary key, the query must
//! select exactly that key, the query must prepare, and so must the form walhook evaluates
//! at commit time, where the WHERE condition runs over row images from the WAL:
//!
//! ```sql
//! SELECT c."__walhook_row",
//!        (<condition 1, as written>) IS TRUE,  -- c: the first condition's alias (the
//!        ...                                   -- query's alias or its table's name)
//! FROM (SELECT u."__walhook_row", u."c0"::integer AS "id", u."c1"::text AS "status", ...
//!       FROM unnest($1::int4[], $2::text[], $3::text[], ...)
//!            AS u("__walhook_row", "c0", "c1", ...)) AS c
//! ```
//!
//! A condition under another alias `d` is `EXISTS (SELECT FROM (SELECT c.*) AS d WHERE
//! <condition>)` instead. The condition was checked as the WHERE clause of its own query
//! first, so it holds nothing a WHERE clause may not (aggregates, window or set-returning
//! functions), which would change the meaning of a select list.
//!
//! Only the columns a condition may read are sent (see
//! [`Classification::referenced_columns`]).

pub mod baseline;
pub mod definition;

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::config::{quote_ident, Config, RelOp, RelationEvent, TableName, TransitionEvent};
use crate::derive::classification::{
    ClassSpec, ClassifiedTable, Dependency, End, RelationPlan, TransitionSub,
};
use crate::schema::{describe_tables, TableInfo};
use crate::source::SourceError;

pub use definition::{load_dir, Classification};

/// One condition to evaluate: the name the row goes by (the query's alias, or its table's
/// name) and the WHERE expression, as written.
pub struct Condition<'a> {
    pub alias: &'a str,
    pub predicate: &'a str,
}

impl<'a> From<&'a Classification> for Condition<'a> {
    fn from(c: &'a Classification) -> Self {
        Condition {
            alias: c.alias.as_deref().unwrap_or(&c.table.name),
            predicate: &c.predicate,
        }
    }
}

/// The text of the query that evaluates `conditions` over row images: `$1` numbers the
/// rows, `$2..` hold one text array per column of `columns` (name, SQL type), and the result
/// has the row number and one boolean per condition (true when it holds; false when it is
/// false or null). Each condition sees the row under its own alias: the first condition's
/// alias names the rows themselves, and the conditions under that alias (usually all) are
/// plain expressions of the select list; one under another alias is a subquery that renames
/// the row (a subplan run per row).
pub fn evaluation_query(columns: &[(String, String)], conditions: &[Condition<'_>]) -> String {
    let mut selected = vec!["u.\"__walhook_row\"".to_string()];
    let mut arrays = vec!["$1::int4[]".to_string()];
    let mut names = vec!["\"__walhook_row\"".to_string()];
    for (i, (name, sql_type)) in columns.iter().enumerate() {
        selected.push(format!("u.\"c{i}\"::{sql_type} AS {}", quote_ident(name)));
        arrays.push(format!("${}::text[]", i + 2));
        names.push(format!("\"c{i}\""));
    }
    let rows = quote_ident(conditions.first().map_or("__walhook_rows", |c| c.alias));
    let tests: Vec<String> = conditions
        .iter()
        .map(|c| {
            let alias = quote_ident(c.alias);
            if alias == rows {
                format!("({}) IS TRUE", c.predicate)
            } else {
                format!(
                    "EXISTS (SELECT FROM (SELECT {rows}.*) AS {alias} WHERE {})",
                    c.predicate
                )
            }
        })
        .collect();
    format!(
        "SELECT {rows}.\"__walhook_row\"{}{} FROM (SELECT {} FROM unnest({}) AS u({})) AS {rows}",
        if tests.is_empty() { "" } else { ", " },
        tests.join(", "),
        selected.join(", "),
        arrays.join(", "),
        names.join(", "),
    )
}

/// The table's columns, in order, with their SQL types.
pub async fn table_columns(
    client: &tokio_postgres::Client,
    oid: u32,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The columns of the table (with types) that `c`'s condition may read.
pub fn referenced(c: &Classification, columns: &[(String, String)]) -> Vec<(String, String)> {
    let names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let wanted = c.referenced_columns(&names);
    columns
        .iter()
        .filter(|(n, _)| wanted.contains(n))
        .cloned()
        .collect()
}

/// One line per classification event that names no classification file.
pub fn check_events<'a>(
    transitions: impl IntoIterator<Item = &'a TransitionEvent>,
    classifications: Option<(&Path, &[Classification])>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for t in transitions {
        match classifications {
            None => problems.push(format!(
                "event {:?} names classification {:?}: pass --classifications DIR with {}.sql in it",
                t.name, t.classification, t.classification
            )),
            Some((dir, found)) if !found.iter().any(|c| c.name == t.classification) => {
                problems.push(format!(
                    "event {:?} names classification {:?}, but {} holds no {}.sql (it has: {})",
                    t.name,
                    t.classification,
                    dir.display(),
                    t.classification,
                    found
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Some(_) => {}
        }
    }
    problems
}

/// The classifications some event uses (the others are not evaluated).
pub fn used<'a>(
    transitions: &[TransitionEvent],
    found: &'a [Classification],
) -> Vec<&'a Classification> {
    found
        .iter()
        .filter(|c| transitions.iter().any(|t| t.classification == c.name))
        .collect()
}

/// The webhooks of event `event`, for a watch (`columns` or `relation`: from and to do not
/// apply).
fn watch_subs(config: &Config, event: &str) -> Vec<TransitionSub> {
    config
        .webhooks
        .iter()
        .enumerate()
        .filter(|(_, w)| w.event == event)
        .map(|(index, w)| TransitionSub {
            webhook: index,
            hook_id: w.id.clone(),
            event: event.to_string(),
            from: crate::config::Side::Any,
            to: crate::config::Side::Any,
            max_rows: w.max_rows,
        })
        .collect()
}

/// The state's name for event `event`'s `columns`: not a classification name (those have
/// no '.').
pub fn watch_name(event: &str) -> String {
    format!("columns.{event}")
}

/// What a `columns` watch's state was built for: its table and columns.
pub fn watch_fingerprint(spec: &ClassSpec) -> String {
    let mut hash = Sha256::new();
    hash.update(spec.table.to_string().as_bytes());
    hash.update([0]);
    hash.update(spec.columns.join("\0").as_bytes());
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Which SQL a classification's state was built for: its query and table. Comments and the
/// recheck interval are not part of it.
pub fn fingerprint(c: &Classification) -> String {
    let mut hash = Sha256::new();
    hash.update(c.table.to_string().as_bytes());
    hash.update([0]);
    hash.update(c.query.as_bytes());
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The classifications that the config's events use, resolved against the catalog: per
/// table, the columns their conditions read, the webhooks that want their transitions, and
/// their dependencies (foreign keys between the table and other tables the condition names).
/// Tables a dependency watches are in the result too (with the columns that tie their rows
/// to the base rows), described into `infos`. Returns the tables and one line per problem.
/// `active_from` is left at 0 for the caller to set.
pub async fn plan(
    client: &tokio_postgres::Client,
    config: &Config,
    classifications: &[Classification],
    infos: &mut BTreeMap<TableName, TableInfo>,
) -> Result<(Vec<ClassifiedTable>, Vec<String>), SourceError> {
    let mut problems = Vec::new();
    // Per table: all its columns with types, its classifications, and the columns other
    // classifications' dependencies read from it.
    let mut tables: BTreeMap<TableName, Planned> = BTreeMap::new();
    for c in classifications {
        if !config
            .transitions
            .iter()
            .any(|t| t.classification == c.name)
        {
            continue;
        }
        let Some(info) = infos.get(&c.table) else {
            continue;
        };
        let mut subs = Vec::new();
        for (index, webhook) in config.webhooks.iter().enumerate() {
            for t in config
                .transitions
                .iter()
                .filter(|t| t.name == webhook.event && t.classification == c.name)
            {
                subs.push(TransitionSub {
                    webhook: index,
                    hook_id: webhook.id.clone(),
                    event: t.name.clone(),
                    from: t.from,
                    to: t.to,
                    max_rows: webhook.max_rows,
                });
            }
        }
        let base_oid = info.oid;
        let all = planned(&mut tables, client, &c.table, base_oid).await?;
        let columns = referenced(c, &all)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        let mut deps = Vec::new();
        for dep in dependencies(client, c, base_oid, &all).await? {
            if !infos.contains_key(&dep.table) {
                let (found, table_problems) =
                    describe_tables(client, std::slice::from_ref(&dep.table)).await?;
                for p in table_problems {
                    problems.push(format!(
                        "{}: the condition reads {} (foreign key {}), whose changes re-evaluate the rows they point to: {p}",
                        c.path.display(),
                        dep.table,
                        dep.constraint
                    ));
                }
                infos.extend(found);
            }
            let Some(dep_info) = infos.get(&dep.table) else {
                continue;
            };
            let oid = dep_info.oid;
            planned(&mut tables, client, &dep.table, oid).await?;
            if let Some(entry) = tables.get_mut(&dep.table) {
                entry.watched.extend(dep.via.iter().cloned());
            }
            deps.push(dep);
        }
        if let Some(entry) = tables.get_mut(&c.table) {
            entry.classes.push(ClassSpec {
                name: c.name.clone(),
                table: c.table.clone(),
                alias: c.alias.clone().unwrap_or_else(|| c.table.name.clone()),
                predicate: c.predicate.clone(),
                columns,
                active_from: 0,
                subs,
                recheck: c.recheck,
                deps,
                watch: false,
                relation: None,
            });
        }
    }
    // `columns = [...]` events: the state keeps those columns of every row, and an update
    // counts when one of them differs from it.
    for e in config.events.iter().filter(|e| !e.columns.is_empty()) {
        let Some(info) = infos.get(&e.table) else {
            continue;
        };
        let all = planned(&mut tables, client, &e.table, info.oid).await?;
        let missing: Vec<&str> = e
            .columns
            .iter()
            .filter(|c| !all.iter().any(|(name, _)| name == *c))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "event {:?}: `columns` names {} not in table {} (it has: {}); fix the column names",
                e.name,
                missing.join(", "),
                e.table,
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        }
        let subs = watch_subs(config, &e.name);
        if let Some(entry) = tables.get_mut(&e.table) {
            entry.classes.push(ClassSpec {
                name: watch_name(&e.name),
                table: e.table.clone(),
                alias: e.table.name.clone(),
                predicate: String::new(),
                columns: all
                    .iter()
                    .filter(|(name, _)| e.columns.contains(name))
                    .map(|(name, _)| name.clone())
                    .collect(),
                active_from: 0,
                subs,
                recheck: None,
                deps: Vec::new(),
                watch: true,
                relation: None,
            });
        }
    }
    // Relation events: the links are kept per row of the table that holds them (the
    // referencing table of a foreign key, or the join table).
    for e in config.events.iter() {
        let Some(relation) = &e.relation else {
            continue;
        };
        let resolved = match resolve_relation(client, &e.table, relation).await? {
            Ok(resolved) => resolved,
            Err(problem) => {
                problems.push(format!("event {:?}: {problem}", e.name));
                continue;
            }
        };
        if resolved.related_change_unsupported && relation.ops.contains(&RelOp::RelatedChange) {
            problems.push(format!(
                "event {:?}: related_change counts changes of the rows that point to the event's table; with foreign key {} the event's table {} is the one pointing: subscribe from {} instead",
                e.name, relation.name, e.table, resolved.other
            ));
            continue;
        }
        if !infos.contains_key(&resolved.watched) {
            let (found, table_problems) =
                describe_tables(client, std::slice::from_ref(&resolved.watched)).await?;
            for p in table_problems {
                problems.push(format!(
                    "event {:?}: relation {}: {p}",
                    e.name, relation.name
                ));
            }
            infos.extend(found);
        }
        let Some(info) = infos.get(&resolved.watched) else {
            continue;
        };
        let oid = info.oid;
        let all = planned(&mut tables, client, &resolved.watched, oid).await?;
        let subs = watch_subs(config, &e.name);
        let pointing: Vec<&String> = [&resolved.plan.row, &resolved.plan.related]
            .into_iter()
            .flat_map(|end| match end {
                End::Own => Vec::new(),
                End::Points { columns, .. } => columns.iter().collect(),
            })
            .collect();
        let columns = all
            .iter()
            .filter(|(name, _)| pointing.contains(&name))
            .map(|(name, _)| name.clone())
            .collect();
        if let Some(entry) = tables.get_mut(&resolved.watched) {
            entry.classes.push(ClassSpec {
                name: format!("relation.{}", e.name),
                table: resolved.watched.clone(),
                alias: resolved.watched.name.clone(),
                predicate: String::new(),
                columns,
                active_from: 0,
                subs,
                recheck: None,
                deps: Vec::new(),
                watch: true,
                relation: Some(resolved.plan),
            });
        }
    }
    let result = tables
        .into_iter()
        .map(|(table, p)| {
            let columns = p
                .all
                .into_iter()
                .filter(|(name, _)| {
                    p.watched.contains(name) || p.classes.iter().any(|c| c.columns.contains(name))
                })
                .collect();
            ClassifiedTable {
                key: infos.get(&table).map(|i| i.key.clone()).unwrap_or_default(),
                table,
                columns,
                classes: p.classes,
            }
        })
        .collect();
    Ok((result, problems))
}

/// A table in the making of a plan.
#[derive(Default)]
struct Planned {
    all: Vec<(String, String)>,
    classes: Vec<ClassSpec>,
    watched: std::collections::BTreeSet<String>,
}

/// The table's columns, entering it into `tables` when new.
async fn planned(
    tables: &mut BTreeMap<TableName, Planned>,
    client: &tokio_postgres::Client,
    table: &TableName,
    oid: u32,
) -> Result<Vec<(String, String)>, SourceError> {
    if let Some(p) = tables.get(table) {
        return Ok(p.all.clone());
    }
    let all = table_columns(client, oid).await?;
    tables.insert(
        table.clone(),
        Planned {
            all: all.clone(),
            ..Planned::default()
        },
    );
    Ok(all)
}

/// A relation event resolved against the catalog.
struct Resolved {
    /// The table whose rows hold the links.
    watched: TableName,
    plan: RelationPlan,
    /// The other table (for messages).
    other: TableName,
    /// related_change cannot apply: the event's table is the referencing one.
    related_change_unsupported: bool,
}

/// One foreign key from the catalog.
struct ForeignKey {
    name: String,
    from: TableName,
    to: TableName,
    /// (referencing column, referenced column), in the constraint's order.
    pairs: Vec<(String, String)>,
}

async fn foreign_keys(
    client: &tokio_postgres::Client,
    condition: &str,
    param: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Vec<ForeignKey>, SourceError> {
    let rows = client
        .query(
            &format!(
                "SELECT con.conname::text, cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text, \
                        (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                           FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum), \
                        (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                           FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord) \
                           JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum) \
                 FROM pg_constraint con \
                 JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace \
                 JOIN pg_class p ON p.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace \
                 WHERE con.contype = 'f' AND {condition} ORDER BY con.conname"
            ),
            &[param],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let from_cols: Vec<String> = r.get(5);
            let to_cols: Vec<String> = r.get(6);
            ForeignKey {
                name: r.get(0),
                from: TableName {
                    schema: r.get(1),
                    name: r.get(2),
                },
                to: TableName {
                    schema: r.get(3),
                    name: r.get(4),
                },
                pairs: from_cols.into_iter().zip(to_cols).collect(),
            }
        })
        .collect())
}

/// The end of `fk` at its referenced table, as that table's primary key.
async fn points(
    client: &tokio_postgres::Client,
    fk: &ForeignKey,
) -> Result<Result<End, String>, SourceError> {
    let (infos, problems) = describe_tables(client, std::slice::from_ref(&fk.to)).await?;
    let Some(info) = infos.get(&fk.to) else {
        return Ok(Err(problems.join("; ")));
    };
    let mut columns = Vec::new();
    for k in &info.key {
        match fk.pairs.iter().find(|(_, to)| *to == k.name) {
            Some((from, _)) => columns.push(from.clone()),
            None => {
                return Ok(Err(format!(
                    "foreign key {} references columns of {} other than its primary key; walhook names related rows by primary key",
                    fk.name, fk.to
                )))
            }
        }
    }
    if columns.len() != fk.pairs.len() {
        return Ok(Err(format!(
            "foreign key {} references columns of {} other than its primary key; walhook names related rows by primary key",
            fk.name, fk.to
        )));
    }
    Ok(Ok(End::Points {
        columns,
        key: info.key.clone(),
    }))
}

/// Resolves `relation` (a foreign key constraint name, or a join table `schema.table`) for
/// an event on `table`. The inner error is the user's problem, one line.
async fn resolve_relation(
    client: &tokio_postgres::Client,
    table: &TableName,
    relation: &RelationEvent,
) -> Result<Result<Resolved, String>, SourceError> {
    let ops = relation.ops.clone();
    if relation.name.contains('.') {
        let Some(join) = TableName::parse(&relation.name) else {
            return Ok(Err(format!(
                "relation {:?} is neither a constraint name nor schema.table",
                relation.name
            )));
        };
        let keys = foreign_keys(
            client,
            "con.conrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname || '.' || c.relname = $1)",
            &join.to_string(),
        )
        .await?;
        if keys.len() != 2 {
            return Ok(Err(format!(
                "join table {join} must have exactly two foreign keys to be a relation (it has {}{}); name a foreign key constraint instead",
                keys.len(),
                if keys.is_empty() { ", or does not exist" } else { "" }
            )));
        }
        let (mine, other) = if keys[0].to == *table {
            (&keys[0], &keys[1])
        } else if keys[1].to == *table {
            (&keys[1], &keys[0])
        } else {
            return Ok(Err(format!(
                "join table {join} links {} and {}, not the event's table {table}",
                keys[0].to, keys[1].to
            )));
        };
        let row = match points(client, mine).await? {
            Ok(end) => end,
            Err(problem) => return Ok(Err(problem)),
        };
        let related = match points(client, other).await? {
            Ok(end) => end,
            Err(problem) => return Ok(Err(problem)),
        };
        return Ok(Ok(Resolved {
            watched: join,
            other: other.to.clone(),
            related_change_unsupported: false,
            plan: RelationPlan {
                name: relation.name.clone(),
                ops,
                table: table.clone(),
                row,
                related,
            },
        }));
    }
    let keys = foreign_keys(client, "con.conname = $1", &relation.name).await?;
    if keys.is_empty() {
        return Ok(Err(format!(
            "relation {:?} is not a foreign key constraint of this database (a join table is named schema.table); check the name in \\d of the referencing table",
            relation.name
        )));
    }
    let Some(fk) = keys.iter().find(|k| k.from == *table || k.to == *table) else {
        return Ok(Err(format!(
            "foreign key {} links {} to {}, not the event's table {table}; subscribe from one of them",
            relation.name, keys[0].from, keys[0].to
        )));
    };
    if fk.from == fk.to {
        return Ok(Err(format!(
            "foreign key {} references its own table; not supported as a relation yet",
            relation.name
        )));
    }
    let parent = match points(client, fk).await? {
        Ok(end) => end,
        Err(problem) => return Ok(Err(problem)),
    };
    let (row, related, other) = if fk.to == *table {
        (parent, End::Own, fk.from.clone())
    } else {
        (End::Own, parent, fk.to.clone())
    };
    Ok(Ok(Resolved {
        watched: fk.from.clone(),
        related_change_unsupported: fk.from == *table,
        other,
        plan: RelationPlan {
            name: relation.name.clone(),
            ops,
            table: table.clone(),
            row,
            related,
        },
    }))
}

/// The foreign keys between `c`'s table and the other tables its condition names (one hop,
/// either direction).
async fn dependencies(
    client: &tokio_postgres::Client,
    c: &Classification,
    base_oid: u32,
    base_columns: &[(String, String)],
) -> Result<Vec<Dependency>, SourceError> {
    // The tables it names, even when it also uses the whole row.
    let (words, _) = c.scan_words();
    let rows = client
        .query(
            "SELECT con.conname::text, con.conrelid = $1, n.nspname::text, o.relname::text, \
                    (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                       FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                       JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum), \
                    (SELECT array_agg(a.attname::text ORDER BY k.ord) \
                       FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord) \
                       JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum), \
                    EXISTS (SELECT FROM pg_index i WHERE i.indrelid = con.conrelid \
                              AND (i.indkey::int2[])[0:cardinality(con.conkey) - 1] @> con.conkey \
                              AND (i.indkey::int2[])[0:cardinality(con.conkey) - 1] <@ con.conkey), \
                    con.conrelid::regclass::text, \
                    format('CREATE INDEX ON %s (%s)', con.conrelid::regclass, \
                           (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) \
                              FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                              JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum)) \
             FROM pg_constraint con \
             JOIN pg_class o ON o.oid = CASE WHEN con.conrelid = $1 THEN con.confrelid ELSE con.conrelid END \
             JOIN pg_namespace n ON n.oid = o.relnamespace \
             WHERE con.contype = 'f' AND (con.conrelid = $1 OR con.confrelid = $1) \
               AND con.conrelid <> con.confrelid \
             ORDER BY con.conname",
            &[&base_oid],
        )
        .await?;
    let mut deps = Vec::new();
    for row in rows {
        let constraint: String = row.get(0);
        let base_refers: bool = row.get(1);
        let table = TableName {
            schema: row.get(2),
            name: row.get(3),
        };
        if !words.contains(&table.name) {
            continue;
        }
        let fk: Vec<String> = row.get(4);
        let referenced: Vec<String> = row.get(5);
        let indexed: bool = row.get(6);
        if !indexed {
            // The condition looks rows up by the foreign key's columns (and walhook finds the
            // base rows a changed row points to by them): without an index each lookup scans
            // the table, once per row.
            let referencing: String = row.get(7);
            let fix: String = row.get(8);
            tracing::warn!(
                "{}: no index on {referencing} ({}), the foreign key {constraint} the condition follows: the baseline and every re-evaluation scan {referencing} once per row; fix: {fix}",
                c.path.display(),
                fk.join(", "),
            );
        }
        // The base table's columns on its side of the key, and the other table's.
        let (base, via) = if base_refers {
            (fk, referenced)
        } else {
            (referenced, fk)
        };
        let base: Vec<(String, String)> = base
            .iter()
            .filter_map(|name| base_columns.iter().find(|(n, _)| n == name).cloned())
            .collect();
        if base.len() != via.len() {
            continue;
        }
        deps.push(Dependency {
            table,
            constraint,
            via,
            base,
        });
    }
    Ok(deps)
}

/// Checks classifications against the database. One line per problem, naming the file (and
/// line where PostgreSQL reports a position) and the fix.
pub async fn validate(
    client: &tokio_postgres::Client,
    classifications: &[Classification],
) -> Result<Vec<String>, SourceError> {
    let mut problems = Vec::new();
    for c in classifications {
        let file = c.path.display();
        let (tables, table_problems) =
            describe_tables(client, std::slice::from_ref(&c.table)).await?;
        for p in table_problems {
            problems.push(format!("{file}: {p}"));
        }
        let Some(info) = tables.get(&c.table) else {
            continue;
        };
        let key: Vec<&str> = info.key.iter().map(|k| k.name.as_str()).collect();
        let mut selected: Vec<&str> = c.columns.iter().map(String::as_str).collect();
        let mut sorted_key = key.clone();
        selected.sort();
        sorted_key.sort();
        if selected != sorted_key {
            problems.push(format!(
                "{file}:{}: the query selects ({}) but the primary key of {} is ({}); select exactly the primary key",
                c.query_line,
                c.columns.join(", "),
                c.table,
                key.join(", ")
            ));
            continue;
        }
        if let Err(e) = client.prepare(&c.query).await {
            problems.push(rejected(c, &c.query, c.query_line, &e));
            continue;
        }
        let columns = referenced(c, &table_columns(client, info.oid).await?);
        let evaluation = evaluation_query(&columns, &[Condition::from(c)]);
        if let Err(e) = client.prepare(&evaluation).await {
            let message = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            problems.push(format!(
                "{file}:{}: the condition cannot be evaluated on a row image ({message}); refer to the row's columns through {} or unqualified, not with the schema name",
                c.predicate_line,
                c.alias.as_deref().unwrap_or(&c.table.name)
            ));
        }
    }
    Ok(problems)
}

/// PostgreSQL's complaint about `sql` (which starts at `first_line` of the file), with the
/// line its error position points to.
fn rejected(c: &Classification, sql: &str, first_line: u64, e: &tokio_postgres::Error) -> String {
    let file = c.path.display();
    let Some(db) = e.as_db_error() else {
        return format!("{file}: PostgreSQL could not check the query: {e}");
    };
    let line = match db.position() {
        Some(tokio_postgres::error::ErrorPosition::Original(pos)) => {
            let before: String = sql
                .chars()
                .take((*pos as usize).saturating_sub(1))
                .collect();
            first_line + before.matches('\n').count() as u64
        }
        _ => first_line,
    };
    format!(
        "{file}:{line}: PostgreSQL rejects the query: {}; fix it (psql -f {file} shows the same error)",
        db.message()
    )
}
