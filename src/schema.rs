//! What walhook needs to know about the configured tables, read from PostgreSQL's catalog:
//! that they exist, their primary key columns, and whether their replica identity lets
//! updates and deletes name the row.

use std::collections::BTreeMap;

use crate::config::TableName;

/// One column of a table's primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    pub name: String,
    pub type_oid: u32,
}

/// A configured table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: TableName,
    pub oid: u32,
    pub key: Vec<KeyColumn>,
}

/// Looks the tables up. Returns the ones that are usable and one line per problem (what is
/// wrong with which table, and the SQL that fixes it).
pub async fn describe_tables(
    client: &tokio_postgres::Client,
    tables: &[TableName],
) -> Result<(BTreeMap<TableName, TableInfo>, Vec<String>), tokio_postgres::Error> {
    let mut found = BTreeMap::new();
    let mut problems = Vec::new();
    for table in tables {
        let rows = client
            .query(
                "SELECT c.oid, c.relreplident::text, c.relkind::text \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&table.schema, &table.name],
            )
            .await?;
        let Some(row) = rows.first() else {
            problems.push(format!(
                "table {table} does not exist in this database; create it, or fix the table name in the config"
            ));
            continue;
        };
        let oid: u32 = row.get(0);
        let replident: String = row.get(1);
        let relkind: String = row.get(2);
        if relkind != "r" && relkind != "p" {
            problems.push(format!(
                "{table} is not an ordinary table (relkind {relkind:?}); logical replication only publishes tables"
            ));
            continue;
        }
        let key: Vec<KeyColumn> = client
            .query(
                "SELECT a.attname::text, a.atttypid \
                 FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| KeyColumn {
                name: r.get(0),
                type_oid: r.get(1),
            })
            .collect();
        if key.is_empty() {
            problems.push(format!(
                "table {table} has no primary key; walhook names rows by primary key: ALTER TABLE {} ADD PRIMARY KEY (...)",
                table.quoted()
            ));
            continue;
        }
        match replident.as_str() {
            "d" | "f" => {}
            "n" => {
                problems.push(format!(
                    "table {table} has REPLICA IDENTITY NOTHING, so updates and deletes cannot name their row; run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
                    table.quoted()
                ));
                continue;
            }
            _ => {
                // USING INDEX: the old-row image carries that index's columns only; it works
                // when they include the primary key.
                let index_columns: Vec<String> = client
                    .query(
                        "SELECT a.attname::text FROM pg_index i \
                         CROSS JOIN LATERAL unnest(i.indkey) AS k(attnum) \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                         WHERE i.indrelid = $1 AND i.indisreplident",
                        &[&oid],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if !key.iter().all(|k| index_columns.contains(&k.name)) {
                    problems.push(format!(
                        "table {table}'s replica identity index does not contain its primary key, so deletes cannot name their row; run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
                        table.quoted()
                    ));
                    continue;
                }
            }
        }
        found.insert(
            table.clone(),
            TableInfo {
                name: table.clone(),
                oid,
                key,
            },
        );
    }
    Ok((found, problems))
}
