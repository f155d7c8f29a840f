//! Classifications: boolean properties of rows, each defined by a SQL file
//! ([`definition`]), checked against the database here.
//!
//! Checking asks PostgreSQL itself: the table must exist with a primary key, the query must
//! select exactly that key, the query must prepare, and so must the form walhook evaluates
//! at commit time, where the WHERE condition runs over row images from the WAL:
//!
//! ```sql
//! SELECT c."__walhook_row" FROM (
//!     SELECT u."__walhook_row", u."c1"::integer AS "id", u."c2"::text AS "status", ...
//!     FROM unnest($1::int4[], $2::text[], $3::text[], ...) AS u("__walhook_row", "c1", "c2", ...)
//! ) AS c                      -- the query's alias, or the table's name
//! WHERE <the condition, as written>
//! ```
//!
//! Evaluating classifications while streaming is not implemented yet; `walhook check`
//! validates the files so they are ready when it is.

pub mod definition;

use crate::config::quote_ident;
use crate::schema::describe_tables;
use crate::source::SourceError;

pub use definition::{load_dir, Classification};

/// The text of the query that evaluates `c`'s condition over row images: one text array
/// per column (`$2..`), and `$1` numbering the rows. `columns` are the table's columns with
/// their SQL types, in order.
pub fn evaluation_query(c: &Classification, columns: &[(String, String)]) -> String {
    let alias = quote_ident(c.alias.as_deref().unwrap_or(&c.table.name));
    let mut casts = Vec::with_capacity(columns.len());
    let mut arrays = vec!["$1::int4[]".to_string()];
    let mut names = vec!["\"__walhook_row\"".to_string()];
    for (i, (name, sql_type)) in columns.iter().enumerate() {
        casts.push(format!("u.\"c{i}\"::{sql_type} AS {}", quote_ident(name)));
        arrays.push(format!("${}::text[]", i + 2));
        names.push(format!("\"c{i}\""));
    }
    format!(
        "SELECT {alias}.\"__walhook_row\" FROM (SELECT u.\"__walhook_row\", {} FROM unnest({}) AS u({})) AS {alias} WHERE {}",
        casts.join(", "),
        arrays.join(", "),
        names.join(", "),
        c.predicate
    )
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
        let columns: Vec<(String, String)> = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&info.oid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let evaluation = evaluation_query(c, &columns);
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
