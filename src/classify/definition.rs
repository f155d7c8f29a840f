//! Classification files: `DIR/NAME.sql`, one query of the form
//!
//! ```sql
//! -- A customer is active when it is not deleted and has status 'active'.
//! -- recheck: 10m
//! SELECT id FROM public.customers c WHERE c.status = 'active' AND c.deleted_at IS NULL
//! ```
//!
//! The file is split with sqlparser's tokenizer (so comments, strings, quoted identifiers and
//! dollar quotes are understood) into the selected key columns, the table, its alias and the
//! WHERE expression, kept exactly as written. Whether the SQL is valid PostgreSQL is decided
//! by PostgreSQL itself (see [`super::validate`]): sqlparser's grammar is narrower than
//! PostgreSQL's, so it never judges the expression.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer, Word};

use crate::config::TableName;

/// One classification, as its file defines it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The file stem: what events name in `classification = "..."`.
    pub name: String,
    pub path: PathBuf,
    /// The whole query, as written (without a trailing semicolon).
    pub query: String,
    /// 1-based line of the file where the query starts.
    pub query_line: u64,
    pub table: TableName,
    /// The alias the query gives the table, if any; the WHERE expression refers to the row
    /// through it (or through the bare table name).
    pub alias: Option<String>,
    /// The selected columns, in order: they must be the table's primary key.
    pub columns: Vec<String>,
    /// The WHERE expression, exactly as written.
    pub predicate: String,
    /// 1-based line of the file where the WHERE expression starts.
    pub predicate_line: u64,
    /// `-- recheck: INTERVAL`: re-evaluate every row this often.
    pub recheck: Option<Duration>,
}

impl Classification {
    /// The columns of `table_columns` the condition may read: every column whose name
    /// appears as a word in it (a superset: a word may name another table's column), or all
    /// of them when the condition uses the whole row (`c`, `c.*`). Only these are kept in the
    /// row state store and sent for evaluation.
    pub fn referenced_columns(&self, table_columns: &[String]) -> Vec<String> {
        match self.words() {
            None => table_columns.to_vec(),
            Some(words) => table_columns
                .iter()
                .filter(|c| words.contains(*c))
                .cloned()
                .collect(),
        }
    }

    /// The identifiers of the condition as PostgreSQL folds them; `None` when it uses the
    /// whole row (`c`, `c.*`), i.e. every column.
    pub fn words(&self) -> Option<std::collections::HashSet<String>> {
        let (words, whole_row) = self.scan_words();
        (!whole_row).then_some(words)
    }

    /// The identifiers of the condition, and whether it uses the whole row.
    pub fn scan_words(&self) -> (std::collections::HashSet<String>, bool) {
        let mut words = std::collections::HashSet::new();
        let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, &self.predicate).tokenize() else {
            return (words, true);
        };
        let own = self
            .alias
            .clone()
            .unwrap_or_else(|| self.table.name.clone());
        let significant: Vec<&Token> = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        let mut whole_row = false;
        for (i, token) in significant.iter().enumerate() {
            let Some(word) = identifier(token) else {
                continue;
            };
            if word == own {
                whole_row |= match significant.get(i + 1) {
                    Some(Token::Period) => matches!(significant.get(i + 2), Some(Token::Mul)),
                    _ => true,
                };
            }
            words.insert(word);
        }
        (words, whole_row)
    }
}

/// Reads every `*.sql` file of `dir`, in name order. Returns the classifications that parse
/// and one line per problem (file, line, what, fix).
pub fn load_dir(dir: &Path) -> (Vec<Classification>, Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!(
                    "--classifications {}: cannot read the directory ({e})",
                    dir.display()
                )],
            )
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    paths.sort();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match std::fs::read_to_string(&path) {
            Err(e) => problems.push(format!("{}: cannot read ({e})", path.display())),
            Ok(text) => match parse(&name, &path, &text) {
                Ok(c) => found.push(c),
                Err(problem) => problems.push(problem),
            },
        }
    }
    (found, problems)
}

/// Parses one classification file. The error names the file and line and says how to fix it.
pub fn parse(name: &str, path: &Path, text: &str) -> Result<Classification, String> {
    let at = |line: u64| format!("{}:{line}", path.display());
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "{}: the file name {name:?} is the classification's name: use only letters, digits, '_' and '-'",
            at(1)
        ));
    }
    let recheck = parse_recheck(text, path)?;
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, text)
        .tokenize_with_location()
        .map_err(|e| format!("{}: does not parse: {e}", at(e.location.line)))?;
    let offsets = LineOffsets::new(text);
    let mut t = Tokens {
        tokens: &tokens,
        at: 0,
    };
    let form = "write it as: SELECT <primary key columns> FROM <table> [alias] WHERE <condition>";

    let start = t.next_significant();
    let query_start = match start {
        Some(tok) if is_keyword(&tok.token, Keyword::SELECT) => tok.span.start,
        Some(tok) => {
            return Err(format!(
                "{}: expected SELECT, found '{}'; {form}",
                at(tok.span.start.line),
                tok.token
            ))
        }
        None => return Err(format!("{}: the file holds no query; {form}", at(1))),
    };

    // The selected columns: identifiers, optionally qualified, separated by commas.
    let mut selected: Vec<(Option<String>, String, u64)> = Vec::new();
    loop {
        let Some(tok) = t.next_significant() else {
            return Err(format!(
                "{}: the query ends before FROM; {form}",
                at(query_start.line)
            ));
        };
        let line = tok.span.start.line;
        let Some(first) = identifier(&tok.token) else {
            return Err(format!(
                "{}: the query must select only the primary key column(s), found '{}'; {form}",
                at(line),
                tok.token
            ));
        };
        let mut column = (None, first, line);
        if t.peek_is(&Token::Period) {
            t.next_significant();
            match t.next_significant().and_then(|tok| identifier(&tok.token)) {
                Some(second) => column = (Some(column.1), second, line),
                None => {
                    return Err(format!(
                        "{}: expected a column name after '.'; {form}",
                        at(line)
                    ))
                }
            }
        }
        selected.push(column);
        match t.next_significant() {
            Some(tok) if tok.token == Token::Comma => continue,
            Some(tok) if is_keyword(&tok.token, Keyword::FROM) => break,
            Some(tok) => {
                return Err(format!(
                    "{}: the query must select only the primary key column(s), found '{}'; {form}",
                    at(tok.span.start.line),
                    tok.token
                ))
            }
            None => {
                return Err(format!("{}: the query ends before FROM; {form}", at(line)));
            }
        }
    }

    // The table, optionally schema-qualified, and its alias.
    let Some(tok) = t.next_significant() else {
        return Err(format!(
            "{}: the query ends after FROM; {form}",
            at(query_start.line)
        ));
    };
    let table_line = tok.span.start.line;
    let Some(first) = identifier(&tok.token) else {
        return Err(format!(
            "{}: expected a table name after FROM, found '{}'; {form}",
            at(table_line),
            tok.token
        ));
    };
    let table = if t.peek_is(&Token::Period) {
        t.next_significant();
        match t.next_significant().and_then(|tok| identifier(&tok.token)) {
            Some(name) => TableName {
                schema: first,
                name,
            },
            None => {
                return Err(format!(
                    "{}: expected a table name after '.'; {form}",
                    at(table_line)
                ))
            }
        }
    } else {
        TableName {
            schema: "public".into(),
            name: first,
        }
    };
    let mut alias = None;
    let mut next = t.next_significant();
    if next.is_some_and(|tok| is_keyword(&tok.token, Keyword::AS)) {
        next = t.next_significant();
    }
    if let Some(tok) = next {
        if matches!(&tok.token, Token::Word(w) if w.quote_style.is_none() && ends_condition(w.keyword))
        {
            return Err(format!(
                "{}: the query has no WHERE condition before {}; {form}",
                at(tok.span.start.line),
                tok.token
            ));
        }
        if !is_keyword(&tok.token, Keyword::WHERE) {
            match identifier(&tok.token) {
                Some(name) if !is_reserved(&tok.token) => {
                    alias = Some(name);
                    next = t.next_significant();
                }
                _ => {
                    return Err(format!(
                    "{}: one table only (no JOIN or second table), then WHERE; found '{}'; {form}",
                    at(tok.span.start.line),
                    tok.token
                ))
                }
            }
        }
    }
    let where_token = match next {
        Some(tok) if is_keyword(&tok.token, Keyword::WHERE) => tok,
        Some(tok) => {
            return Err(format!(
                "{}: expected WHERE after the table, found '{}'; {form}",
                at(tok.span.start.line),
                tok.token
            ))
        }
        None => {
            return Err(format!(
                "{}: the query has no WHERE condition; {form}",
                at(table_line)
            ))
        }
    };

    // The condition: everything after WHERE, up to a trailing semicolon.
    let mut depth = 0i32;
    let mut first: Option<&TokenWithSpan> = None;
    let mut last: Option<&TokenWithSpan> = None;
    let mut semicolon = false;
    while let Some(tok) = t.next_significant() {
        if semicolon {
            return Err(format!(
                "{}: one query per file; move the second statement into its own file",
                at(tok.span.start.line)
            ));
        }
        match &tok.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth -= 1,
            Token::SemiColon if depth == 0 => {
                semicolon = true;
                continue;
            }
            Token::Word(w) if depth == 0 && ends_condition(w.keyword) => {
                return Err(format!(
                    "{}: {} is not allowed after the WHERE condition (the query lists members; order, grouping and limits do not apply); {form}",
                    at(tok.span.start.line),
                    w.value.to_uppercase()
                ));
            }
            _ => {}
        }
        first.get_or_insert(tok);
        last = Some(tok);
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Err(format!(
            "{}: WHERE has no condition; {form}",
            at(where_token.span.start.line)
        ));
    };
    let predicate = text[offsets.byte(text, first.span.start)..offsets.byte(text, last.span.end)]
        .trim()
        .to_string();
    let query = text[offsets.byte(text, query_start)..offsets.byte(text, last.span.end)]
        .trim()
        .to_string();

    // Qualified columns must name the query's own table.
    let own = alias.clone().unwrap_or_else(|| table.name.clone());
    for (qualifier, column, line) in &selected {
        if let Some(q) = qualifier {
            if *q != own {
                return Err(format!(
                    "{}: column {q}.{column} does not belong to the query's table {}; select the table's primary key",
                    at(*line),
                    own
                ));
            }
        }
    }
    Ok(Classification {
        name: name.to_string(),
        path: path.to_path_buf(),
        query,
        query_line: query_start.line,
        table,
        alias,
        columns: selected.into_iter().map(|(_, c, _)| c).collect(),
        predicate,
        predicate_line: first.span.start.line,
        recheck,
    })
}

/// `-- recheck: 10m` in a comment line.
fn parse_recheck(text: &str, path: &Path) -> Result<Option<Duration>, String> {
    let mut recheck = None;
    for (i, line) in text.lines().enumerate() {
        let Some(comment) = line.trim_start().strip_prefix("--") else {
            continue;
        };
        let Some(value) = comment.trim().strip_prefix("recheck:") else {
            continue;
        };
        let value = value.trim();
        match humantime::parse_duration(value) {
            Ok(d) if d >= Duration::from_secs(1) => recheck = Some(d),
            Ok(_) => {
                return Err(format!(
                    "{}:{}: recheck {value:?} is shorter than a second; use e.g. 30s or 10m",
                    path.display(),
                    i + 1
                ))
            }
            Err(e) => {
                return Err(format!(
                "{}:{}: recheck {value:?} is not a duration ({e}); write e.g. \"-- recheck: 10m\"",
                path.display(),
                i + 1
            ))
            }
        }
    }
    Ok(recheck)
}

/// Words that would end the WHERE condition at the top level: the query would then do more
/// than list members.
fn ends_condition(keyword: Keyword) -> bool {
    matches!(
        keyword,
        Keyword::ORDER
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::FETCH
            | Keyword::UNION
            | Keyword::INTERSECT
            | Keyword::EXCEPT
            | Keyword::WINDOW
            | Keyword::FOR
    )
}

/// Words that cannot be an alias here (`FROM t JOIN ...`, `FROM t, u`).
fn is_reserved(token: &Token) -> bool {
    matches!(token, Token::Word(Word { keyword, quote_style: None, .. })
        if matches!(keyword, Keyword::JOIN | Keyword::INNER | Keyword::LEFT | Keyword::RIGHT
            | Keyword::FULL | Keyword::CROSS | Keyword::NATURAL | Keyword::ON | Keyword::USING
            | Keyword::WHERE | Keyword::ORDER | Keyword::GROUP | Keyword::LIMIT))
}

fn is_keyword(token: &Token, keyword: Keyword) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.keyword == keyword)
}

/// An identifier as PostgreSQL resolves it: unquoted names fold to lower case.
fn identifier(token: &Token) -> Option<String> {
    match token {
        Token::Word(w) if w.quote_style == Some('"') => Some(w.value.clone()),
        Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_lowercase()),
        _ => None,
    }
}

struct Tokens<'a> {
    tokens: &'a [TokenWithSpan],
    at: usize,
}

impl<'a> Tokens<'a> {
    fn next_significant(&mut self) -> Option<&'a TokenWithSpan> {
        while let Some(tok) = self.tokens.get(self.at) {
            self.at += 1;
            match tok.token {
                Token::Whitespace(_) => continue,
                Token::EOF => return None,
                _ => return Some(tok),
            }
        }
        None
    }

    fn peek_is(&self, token: &Token) -> bool {
        self.tokens[self.at.min(self.tokens.len())..]
            .iter()
            .find(|t| !matches!(t.token, Token::Whitespace(_)))
            .is_some_and(|t| &t.token == token)
    }
}

/// Maps the tokenizer's (line, column) locations, in characters, to byte offsets.
struct LineOffsets(Vec<usize>);

impl LineOffsets {
    fn new(text: &str) -> LineOffsets {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineOffsets(starts)
    }

    /// Byte offset of `loc`; a span's end column points just past the token.
    fn byte(&self, text: &str, loc: Location) -> usize {
        let line_start = self
            .0
            .get((loc.line as usize).saturating_sub(1))
            .copied()
            .unwrap_or(text.len());
        let column = (loc.column as usize).saturating_sub(1);
        text[line_start..]
            .char_indices()
            .nth(column)
            .map(|(i, _)| line_start + i)
            .unwrap_or(text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Classification {
        parse("c", Path::new("c.sql"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        match parse("c", Path::new("c.sql"), text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_classification_splits_into_its_parts() {
        let c = ok("-- Active customers.\n-- recheck: 10m\nSELECT id FROM public.customers c\nWHERE c.status = 'active'   -- not deleted\n  AND deleted_at IS NULL;\n");
        assert_eq!(c.table.to_string(), "public.customers");
        assert_eq!(c.alias.as_deref(), Some("c"));
        assert_eq!(c.columns, vec!["id"]);
        assert_eq!(
            c.predicate,
            "c.status = 'active'   -- not deleted\n  AND deleted_at IS NULL"
        );
        assert_eq!(c.predicate_line, 4);
        assert_eq!(c.recheck, Some(Duration::from_secs(600)));
        assert!(c.query.starts_with("SELECT id FROM"));
        assert!(c.query.ends_with("IS NULL"));
    }

    #[test]
    fn composite_keys_quoted_names_and_subqueries() {
        let c = ok("select \"Order\".a, b from \"Order\" where exists (select 1 from lines l where l.a = \"Order\".a order by 1 limit 1) and note <> 'x; order by'");
        assert_eq!(c.table.name, "Order");
        assert_eq!(c.table.schema, "public");
        assert_eq!(c.alias, None);
        assert_eq!(c.columns, vec!["a", "b"]);
        assert!(c.predicate.ends_with("'x; order by'"));
        let c = ok("SELECT Id FROM S.T AS x WHERE $$it's$$ <> x.name");
        assert_eq!(c.columns, vec!["id"]);
        assert_eq!(c.table.to_string(), "s.t");
        assert_eq!(c.alias.as_deref(), Some("x"));
    }

    #[test]
    fn wrong_forms_are_refused_with_the_line_and_the_form() {
        for (text, needle) in [
            ("", "holds no query"),
            ("UPDATE t SET a = 1", "expected SELECT"),
            ("SELECT * FROM t WHERE a", "select only the primary key"),
            (
                "SELECT id, count(*) FROM t WHERE a",
                "select only the primary key",
            ),
            ("SELECT id FROM t", "has no WHERE"),
            ("SELECT id FROM t WHERE", "WHERE has no condition"),
            ("SELECT id FROM t JOIN u ON true WHERE a", "one table only"),
            ("SELECT id FROM t, u WHERE a", "one table only"),
            ("SELECT id FROM t x y WHERE a", "expected WHERE"),
            (
                "SELECT id FROM t WHERE a ORDER BY id",
                "ORDER is not allowed",
            ),
            ("SELECT id FROM t WHERE a\nLIMIT 3", "c.sql:2: LIMIT"),
            ("SELECT id FROM t WHERE a UNION SELECT 1", "UNION"),
            ("SELECT id FROM t WHERE a; SELECT 2", "one query per file"),
            ("SELECT u.id FROM t WHERE a", "does not belong"),
            ("SELECT id FROM t WHERE 'unterminated", "does not parse"),
            (
                "-- recheck: soon\nSELECT id FROM t WHERE a",
                "c.sql:1: recheck \"soon\"",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(e.starts_with("c.sql:"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let e = parse(
            "bad name",
            Path::new("bad name.sql"),
            "SELECT id FROM t WHERE a",
        )
        .expect_err("bad name");
        assert!(e.contains("file name"), "{e}");
    }

    #[test]
    fn referenced_columns_are_the_words_of_the_condition() {
        let columns: Vec<String> = ["id", "status", "Email", "deleted_at", "score"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = ok("SELECT id FROM customers c WHERE c.status = 'active' AND \"Email\" <> '' AND deleted_at IS NULL AND EXISTS (SELECT 1 FROM contracts k WHERE k.customer_id = c.id)");
        assert_eq!(
            c.referenced_columns(&columns),
            vec!["id", "status", "Email", "deleted_at"]
        );
        // Unquoted names fold to lower case; a quoted one must match exactly.
        let c = ok("SELECT id FROM customers WHERE EMAIL = 'x' AND customers.Score > 3");
        assert_eq!(c.referenced_columns(&columns), vec!["score"]);
        for whole_row in [
            "SELECT id FROM customers c WHERE row_to_json(c)::text <> ''",
            "SELECT id FROM customers c WHERE (c.*) IS NOT NULL",
        ] {
            assert_eq!(
                ok(whole_row).referenced_columns(&columns),
                columns,
                "{whole_row}"
            );
        }
    }

    #[test]
    fn a_directory_is_read_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b.sql"), "SELECT id FROM t WHERE x").expect("write");
        std::fs::write(dir.path().join("a.sql"), "SELECT id FROM t WHERE y").expect("write");
        std::fs::write(dir.path().join("c.sql"), "SELECT").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let (found, problems) = load_dir(dir.path());
        let names: Vec<&str> = found.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("c.sql"), "{problems:?}");
    }
}
