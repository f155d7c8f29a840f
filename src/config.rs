//! The configuration file: TOML, unknown keys rejected, every problem reported at once.
//!
//! Parsing happens in two steps. `serde` turns the text into raw structs (rejecting unknown
//! keys with the line they sit on); [`Config::from_toml`] then validates the raw structs into
//! the resolved [`Config`] the rest of walhook uses: tables split into schema and name, URLs
//! parsed, secrets decoded, durations parsed. Validation collects every problem before it
//! fails, so a user fixes a config in one round trip.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::deliver::retry::RetrySchedule;
use crate::deliver::sign::SigningKey;

/// How many rows one notification lists at most, unless a webhook says otherwise.
pub const DEFAULT_MAX_ROWS: usize = 1000;
/// How long one HTTP attempt may take, unless a webhook says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Requests in flight per webhook, unless a webhook says otherwise (or `ordered = true`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 8;
/// How long delivered notifications and their attempts are kept.
/// sled keeps an index of the whole log in memory, so delivered entries are not kept long.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The row state cache's default size (`[state] cache_mb`).
pub const DEFAULT_STATE_CACHE_MB: usize = 64;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub events: Vec<Event>,
    /// Classification events (`classification`, `from`, `to`).
    pub transitions: Vec<TransitionEvent>,
    pub webhooks: Vec<Webhook>,
    /// Delivered notifications, with their attempts, are pruned this long after delivery.
    /// Pending and dead ones are kept.
    pub retention: Duration,
    /// `[state] cache_mb`: how much memory the row state cache may take, in bytes (an
    /// estimate; 0 disables it).
    pub state_cache_bytes: usize,
}

/// A classification event: a row's value of a classification going from one state to
/// another in a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionEvent {
    pub name: String,
    pub classification: String,
    pub from: Side,
    pub to: Side,
}

/// One side of a transition: a row's value (`null`: the row does not exist), or any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    True,
    False,
    Null,
    Any,
}

impl Side {
    fn parse(s: &str) -> Option<Side> {
        match s {
            "true" => Some(Side::True),
            "false" => Some(Side::False),
            "null" => Some(Side::Null),
            "any" => Some(Side::Any),
            _ => None,
        }
    }
}

/// A mutation event: which table, which operations.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub table: TableName,
    pub ops: Vec<Op>,
    /// `columns = [...]`: an update counts only when one of these columns really changed
    /// (compared with the row state store). Empty: every update counts.
    pub columns: Vec<String>,
    /// `relation = ...`: a relation event (then `ops` is empty).
    pub relation: Option<RelationEvent>,
}

/// A relation event: links between the event's table and another, through a foreign key
/// (named by its constraint) or a join table (named `schema.table`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationEvent {
    pub name: String,
    pub ops: Vec<RelOp>,
}

/// What a relation event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RelOp {
    Added,
    Removed,
    RelatedChange,
}

impl RelOp {
    pub fn as_str(self) -> &'static str {
        match self {
            RelOp::Added => "relation_added",
            RelOp::Removed => "relation_removed",
            RelOp::RelatedChange => "related_change",
        }
    }

    fn parse(s: &str) -> Option<RelOp> {
        [RelOp::Added, RelOp::Removed, RelOp::RelatedChange]
            .into_iter()
            .find(|op| op.as_str() == s)
    }
}

/// The row operations an event can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    const ALL: [(&'static str, Op); 4] = [
        ("insert", Op::Insert),
        ("update", Op::Update),
        ("delete", Op::Delete),
        ("truncate", Op::Truncate),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        Op::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, op)| *op)
    }
}

/// A webhook endpoint subscribed to one event.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: String,
    pub event: String,
    pub url: reqwest::Url,
    pub keys: Vec<SigningKey>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub ordered: bool,
    pub retry: RetrySchedule,
    pub max_rows: usize,
}

/// A schema-qualified table name, as written in the config (`public.customers` or
/// `customers`, which means `public.customers`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Option<TableName> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        let valid = |part: &str| !part.is_empty() && !part.contains(['.', '"', '\0']);
        (valid(schema) && valid(name)).then(|| TableName {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// The name quoted for SQL: `"public"."customers"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an identifier for SQL, doubling embedded quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL, doubling embedded quotes.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Why a configuration was refused. Every line names the file, what is wrong and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(problems) => problems.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, rename = "event")]
    events: Vec<RawEvent>,
    #[serde(default, rename = "webhook")]
    webhooks: Vec<RawWebhook>,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    state: RawState,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    name: String,
    table: Option<String>,
    on: Option<Vec<String>>,
    classification: Option<String>,
    from: Option<String>,
    to: Option<String>,
    columns: Option<Vec<String>>,
    relation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    id: String,
    event: String,
    url: String,
    secret: Option<OneOrMany>,
    secret_env: Option<String>,
    timeout: Option<String>,
    max_in_flight: Option<usize>,
    #[serde(default)]
    ordered: bool,
    retry: Option<Vec<String>>,
    max_rows: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    retention: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    cache_mb: Option<usize>,
}

/// `secret = "whsec_..."` or, while rotating, `secret = ["whsec_new", "whsec_old"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl Config {
    /// Reads and validates a config file. `env` resolves `secret_env` names (the process
    /// environment in production, a map in tests).
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string(), env)
    }

    /// Validates config text; `origin` names the file in messages.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(vec![describe_toml_error(&e, text, origin)]))?;
        let mut problems = Vec::new();
        let config = validate(raw, origin, &env, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The tables the events read, each once, in a stable order.
    pub fn tables(&self) -> Vec<TableName> {
        let mut tables: Vec<TableName> = self.events.iter().map(|e| e.table.clone()).collect();
        tables.sort();
        tables.dedup();
        tables
    }

    /// The tables the events of a config file name, read even when the file is otherwise
    /// invalid, so that `check` can check them in the same run. Empty when the file is not
    /// even well-formed TOML of the right shape.
    pub fn tables_named_in(path: &Path) -> Vec<TableName> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let Ok(raw) = toml::from_str::<RawConfig>(&text) else {
            return Vec::new();
        };
        let mut tables: Vec<TableName> = raw
            .events
            .iter()
            .filter_map(|e| e.table.as_deref().and_then(TableName::parse))
            .collect();
        tables.sort();
        tables.dedup();
        tables
    }
}

fn validate(
    raw: RawConfig,
    origin: &str,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Config {
    let mut events = Vec::new();
    let mut transitions = Vec::new();
    let mut event_names = HashSet::new();
    for (i, e) in raw.events.into_iter().enumerate() {
        let at = format!("{origin}: [[event]] #{} ({:?})", i + 1, e.name);
        if !valid_id(&e.name) {
            problems.push(format!(
                "{at}: name must be non-empty and use only letters, digits, '_', '-' and '.'"
            ));
        }
        if !event_names.insert(e.name.clone()) {
            problems.push(format!(
                "{at}: another event has the same name; give each event a unique name"
            ));
        }
        if let Some(classification) = &e.classification {
            if let Some(t) = transition(&e, classification, &at, problems) {
                transitions.push(t);
            }
            continue;
        }
        let (Some(table_text), Some(on)) = (&e.table, &e.on) else {
            problems.push(format!(
                "{at}: an event needs `table` and `on` (a row event), or `classification`, `from` and `to` (a classification event)"
            ));
            continue;
        };
        if e.from.is_some() || e.to.is_some() {
            problems.push(format!(
                "{at}: `from` and `to` belong to classification events; remove them or name a `classification` instead of `table`/`on`"
            ));
        }
        let table = TableName::parse(table_text);
        if table.is_none() {
            problems.push(format!(
                "{at}: table {table_text:?} is not a table name; write it as \"schema.table\""
            ));
        }
        if let Some(relation) = &e.relation {
            let mut rel_ops = Vec::new();
            for op in on {
                match RelOp::parse(op) {
                    Some(op) if !rel_ops.contains(&op) => rel_ops.push(op),
                    Some(_) => {}
                    None => problems.push(format!(
                        "{at}: {op:?} in `on` of a relation event; use any of \"relation_added\", \"relation_removed\", \"related_change\" (row operations go in an event without `relation`)"
                    )),
                }
            }
            if on.is_empty() {
                problems.push(format!(
                    "{at}: `on` is empty; list e.g. on = [\"relation_added\", \"relation_removed\"]"
                ));
            }
            if e.columns.is_some() {
                problems.push(format!(
                    "{at}: `columns` restricts updates and does not apply to a relation event; remove it"
                ));
            }
            if relation.trim().is_empty() {
                problems.push(format!(
                    "{at}: `relation` is empty; name a foreign key constraint or a join table (schema.table)"
                ));
            }
            rel_ops.sort();
            if let Some(table) = table {
                events.push(Event {
                    name: e.name,
                    table,
                    ops: Vec::new(),
                    columns: Vec::new(),
                    relation: Some(RelationEvent {
                        name: relation.clone(),
                        ops: rel_ops,
                    }),
                });
            }
            continue;
        }
        let mut ops = Vec::new();
        for op in on {
            match Op::parse(op) {
                Some(op) if !ops.contains(&op) => ops.push(op),
                Some(_) => {}
                None if RelOp::parse(op).is_some() => problems.push(format!(
                    "{at}: {op:?} needs `relation` (a foreign key constraint name or a join table) in the event"
                )),
                None => problems.push(format!(
                    "{at}: unknown operation {op:?} in `on`; use any of \"insert\", \"update\", \"delete\", \"truncate\""
                )),
            }
        }
        if on.is_empty() {
            problems.push(format!(
                "{at}: `on` is empty; list the operations to notify, e.g. on = [\"insert\", \"update\", \"delete\"]"
            ));
        }
        ops.sort();
        let columns = e.columns.clone().unwrap_or_default();
        if e.columns.is_some() {
            if !ops.contains(&Op::Update) {
                problems.push(format!(
                    "{at}: `columns` restricts updates, but `on` lacks \"update\"; add it to `on` or remove `columns`"
                ));
            }
            if columns.is_empty() {
                problems.push(format!(
                    "{at}: `columns` is empty; list the columns whose change counts, or remove it"
                ));
            }
        }
        if let Some(table) = table {
            events.push(Event {
                name: e.name,
                table,
                ops,
                columns,
                relation: None,
            });
        }
    }

    let mut webhooks = Vec::new();
    let mut webhook_ids = HashSet::new();
    for (i, w) in raw.webhooks.into_iter().enumerate() {
        let at = format!("{origin}: [[webhook]] #{} ({:?})", i + 1, w.id);
        if !valid_id(&w.id) {
            problems.push(format!(
                "{at}: id must be non-empty and use only letters, digits, '_', '-' and '.'"
            ));
        }
        if !webhook_ids.insert(w.id.clone()) {
            problems.push(format!(
                "{at}: another webhook has the same id; give each webhook a unique id"
            ));
        }
        if !event_names.contains(&w.event) {
            let known: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
            problems.push(format!(
                "{at}: event {:?} is not defined; define it in an [[event]] section or use one of {known:?}",
                w.event
            ));
        }
        let url = match reqwest::Url::parse(&w.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(url)
            }
            Ok(_) => {
                problems.push(format!(
                    "{at}: url {:?} must be an http:// or https:// URL with a host",
                    w.url
                ));
                None
            }
            Err(e) => {
                problems.push(format!(
                    "{at}: url {:?} is malformed ({e}); write a full URL such as \"https://example.com/hooks\"",
                    w.url
                ));
                None
            }
        };
        let keys = resolve_keys(&w, &at, env, problems);
        let timeout = parse_duration_field(w.timeout.as_deref(), "timeout", &at, problems)
            .unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() || timeout > Duration::from_secs(600) {
            problems.push(format!(
                "{at}: timeout must be between 1ms and 10m (default 15s)"
            ));
        }
        let retry = match &w.retry {
            None => RetrySchedule::standard(),
            Some(delays) => RetrySchedule::new(
                delays
                    .iter()
                    .filter_map(|d| parse_duration_field(Some(d), "retry", &at, problems))
                    .collect(),
            ),
        };
        let max_rows = w.max_rows.unwrap_or(DEFAULT_MAX_ROWS);
        if max_rows == 0 || max_rows > 100_000 {
            problems.push(format!(
                "{at}: max_rows must be between 1 and 100000 (default {DEFAULT_MAX_ROWS})"
            ));
        }
        if w.max_in_flight.is_some_and(|n| n > 1000) {
            problems.push(format!(
                "{at}: max_in_flight must be at most 1000 (default {DEFAULT_MAX_IN_FLIGHT})"
            ));
        }
        let max_in_flight = if w.ordered {
            1
        } else {
            w.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT)
        };
        if max_in_flight == 0 {
            problems.push(format!("{at}: max_in_flight must be at least 1"));
        }
        if w.ordered && w.max_in_flight.is_some_and(|n| n > 1) {
            problems.push(format!(
                "{at}: ordered = true sends one request at a time; remove max_in_flight or set ordered = false"
            ));
        }
        if let (Some(url), Some(keys)) = (url, keys) {
            webhooks.push(Webhook {
                id: w.id,
                event: w.event,
                url,
                keys,
                timeout,
                max_in_flight,
                ordered: w.ordered,
                retry,
                max_rows,
            });
        }
    }
    if webhooks.is_empty() && problems.is_empty() {
        problems.push(format!(
            "{origin}: no [[webhook]] is configured; add one so that events are delivered somewhere"
        ));
    }

    let at = format!("{origin}: [delivery]");
    let retention = parse_duration_field(
        raw.delivery.retention.as_deref(),
        "retention",
        &at,
        problems,
    )
    .unwrap_or(DEFAULT_RETENTION);

    Config {
        events,
        transitions,
        webhooks,
        retention,
        state_cache_bytes: raw
            .state
            .cache_mb
            .unwrap_or(DEFAULT_STATE_CACHE_MB)
            .saturating_mul(1 << 20),
    }
}

/// Validates a classification event's `from`/`to`.
fn transition(
    e: &RawEvent,
    classification: &str,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<TransitionEvent> {
    if e.table.is_some() || e.on.is_some() || e.columns.is_some() || e.relation.is_some() {
        problems.push(format!(
            "{at}: a classification event takes no `table`, `on` or `columns` (the classification's SQL names its table); remove them"
        ));
    }
    let side = |value: &Option<String>, key: &str, problems: &mut Vec<String>| {
        match value {
        None => {
            problems.push(format!(
                "{at}: `{key}` is missing; set it to \"true\", \"false\", \"null\" or \"any\""
            ));
            None
        }
        Some(v) => Side::parse(v).or_else(|| {
            problems.push(format!(
                "{at}: `{key}` is {v:?}; use \"true\", \"false\", \"null\" (the row does not exist) or \"any\""
            ));
            None
        }),
    }
    };
    let from = side(&e.from, "from", problems);
    let to = side(&e.to, "to", problems);
    let (from, to) = (from?, to?);
    if from == to && from != Side::Any {
        problems.push(format!(
            "{at}: from and to are both {:?}, so the event can never fire (a transition changes the value); pick different values or \"any\"",
            e.from.as_deref().unwrap_or_default()
        ));
        return None;
    }
    Some(TransitionEvent {
        name: e.name.clone(),
        classification: classification.to_string(),
        from,
        to,
    })
}

fn resolve_keys(
    w: &RawWebhook,
    at: &str,
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<Vec<SigningKey>> {
    let (secrets, source) = match (&w.secret, &w.secret_env) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "{at}: both secret and secret_env are set; keep one of them"
            ));
            return None;
        }
        (None, None) => {
            problems.push(format!(
                "{at}: no secret; set secret = \"whsec_...\" or secret_env = \"NAME_OF_ENV_VAR\""
            ));
            return None;
        }
        (Some(OneOrMany::One(s)), None) => (vec![s.clone()], "secret".to_string()),
        (Some(OneOrMany::Many(v)), None) => (v.clone(), "secret".to_string()),
        (None, Some(var)) => match env(var) {
            // Several space-separated secrets in one variable support rotation.
            Some(value) => (
                value.split_whitespace().map(str::to_string).collect(),
                format!("secret_env {var:?}"),
            ),
            None => {
                problems.push(format!(
                    "{at}: environment variable {var:?} named by secret_env is not set; export it with the whsec_ secret"
                ));
                return None;
            }
        },
    };
    if secrets.is_empty() {
        problems.push(format!(
            "{at}: {source} holds no secret; give at least one whsec_ secret"
        ));
        return None;
    }
    let mut keys = Vec::new();
    for secret in &secrets {
        match SigningKey::parse(secret) {
            Ok(key) => keys.push(key),
            Err(e) => problems.push(format!("{at}: {source} is not usable: {e}")),
        }
    }
    (keys.len() == secrets.len()).then_some(keys)
}

fn parse_duration_field(
    value: Option<&str>,
    field: &str,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    let value = value?;
    match humantime::parse_duration(value) {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(format!(
                "{at}: {field} {value:?} is not a duration ({e}); write e.g. \"500ms\", \"15s\", \"5m\", \"2h\", \"7d\""
            ));
            None
        }
    }
}

/// Names and ids end up in keys, headers and message ids: keep them to a safe alphabet.
fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// One line naming the file, the line and column, and what serde found wrong.
fn describe_toml_error(e: &toml::de::Error, text: &str, origin: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let hint = if message.starts_with("unknown field") {
                "; fix the spelling or remove the key"
            } else {
                ""
            };
            format!("{origin}:{line}:{column}: {message}{hint}")
        }
        None => format!("{origin}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "walhook.toml", |name| {
            (name == "HOOK_SECRET").then(|| SECRET.to_string())
        })
    }

    fn problems(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => panic!("config was accepted"),
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn a_full_config_resolves() {
        let config = load(&format!(
            r#"
            [[event]]
            name = "customer_changed"
            table = "customers"
            on = ["update", "insert", "delete", "insert"]

            [[webhook]]
            id = "crm-sync"
            event = "customer_changed"
            url = "https://crm.example.com/hooks/db"
            secret = "{SECRET}"
            timeout = "2s"
            retry = ["1s", "1m"]
            max_rows = 10

            [[webhook]]
            id = "audit"
            event = "customer_changed"
            url = "http://127.0.0.1:9000/"
            secret_env = "HOOK_SECRET"
            ordered = true

            [delivery]
            retention = "1d"
            "#
        ))
        .expect("valid config");
        assert_eq!(config.events[0].table.to_string(), "public.customers");
        assert_eq!(
            config.events[0].ops,
            vec![Op::Insert, Op::Update, Op::Delete]
        );
        let crm = &config.webhooks[0];
        assert_eq!(crm.timeout, Duration::from_secs(2));
        assert_eq!(crm.retry.max_attempts(), 3);
        assert_eq!(crm.max_rows, 10);
        assert_eq!(crm.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        let audit = &config.webhooks[1];
        assert!(audit.ordered);
        assert_eq!(audit.max_in_flight, 1);
        assert_eq!(audit.max_rows, DEFAULT_MAX_ROWS);
        assert_eq!(config.retention, Duration::from_secs(86400));
        assert_eq!(config.state_cache_bytes, DEFAULT_STATE_CACHE_MB << 20);
    }

    #[test]
    fn the_state_cache_size_is_set_in_megabytes_and_checked() {
        let base = "[[event]]\nname = \"e\"\ntable = \"t\"\non = [\"insert\"]\n\n[[webhook]]\nid = \"h\"\nevent = \"e\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"whsec_dGVzdHNlY3JldA==\"\n";
        let config = Config::from_toml(
            &format!("{base}\n[state]\ncache_mb = 0\n"),
            "walhook.toml",
            |_| None,
        )
        .expect("valid config");
        assert_eq!(config.state_cache_bytes, 0);
        let config = Config::from_toml(
            &format!("{base}\n[state]\ncache_mb = 8\n"),
            "walhook.toml",
            |_| None,
        )
        .expect("valid config");
        assert_eq!(config.state_cache_bytes, 8 << 20);
        let p = problems(&format!("{base}\n[state]\ncache = 8\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("unknown field `cache`"), "{}", p[0]);
    }

    #[test]
    fn a_misspelt_key_names_line_and_key() {
        let p = problems(
            "[[event]]\nname = \"e\"\ntable = \"t\"\non = [\"insert\"]\n\n[[webhook]]\nid = \"h\"\nevent = \"e\"\nurll = \"http://x\"\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("walhook.toml:9:1: unknown field `urll`"),
            "{}",
            p[0]
        );
        assert!(!p[0].contains('\n'));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let p = problems(
            r#"
            [[event]]
            name = "e"
            table = "a.b.c"
            on = ["insert", "upsert"]

            [[webhook]]
            id = "bad id"
            event = "nope"
            url = "not a url"
            secret = "abc"
            timeout = "soon"

            [[webhook]]
            id = "h2"
            event = "e"
            url = "ftp://example.com/"
            secret_env = "MISSING_VAR"
            "#,
        );
        let all = p.join("\n");
        for needle in [
            "table \"a.b.c\" is not a table name",
            "unknown operation \"upsert\"",
            "id must be non-empty",
            "event \"nope\" is not defined",
            "url \"not a url\" is malformed",
            "secret is not usable",
            "timeout \"soon\" is not a duration",
            "must be an http:// or https:// URL",
            "environment variable \"MISSING_VAR\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("whsec_C2FV"), "a secret leaked into: {all}");
    }

    #[test]
    fn classification_events_are_validated() {
        let hook = format!(
            "[[webhook]]\nid = \"h\"\nevent = \"became_active\"\nurl = \"http://127.0.0.1/\"\nsecret = \"{SECRET}\"\n"
        );
        let config = load(&format!(
            "[[event]]\nname = \"became_active\"\nclassification = \"customer_active\"\nfrom = \"false\"\nto = \"true\"\n{hook}"
        ))
        .expect("valid");
        assert_eq!(
            config.transitions,
            vec![TransitionEvent {
                name: "became_active".into(),
                classification: "customer_active".into(),
                from: Side::False,
                to: Side::True,
            }]
        );
        assert!(config.events.is_empty());
        assert!(load(&format!(
            "[[event]]\nname = \"became_active\"\nclassification = \"c\"\nfrom = \"any\"\nto = \"any\"\n{hook}"
        ))
        .is_ok());
        for (event, needle) in [
            (
                "classification = \"c\"\nfrom = \"yes\"\nto = \"true\"",
                "`from` is \"yes\"",
            ),
            ("classification = \"c\"\nto = \"true\"", "`from` is missing"),
            (
                "classification = \"c\"\nfrom = \"true\"\nto = \"true\"",
                "can never fire",
            ),
            (
                "classification = \"c\"\ntable = \"t\"\nfrom = \"null\"\nto = \"true\"",
                "takes no `table`",
            ),
            ("table = \"t\"", "needs `table` and `on`"),
            (
                "table = \"t\"\non = [\"insert\"]\nfrom = \"true\"",
                "belong to classification events",
            ),
        ] {
            let p = problems(&format!(
                "[[event]]\nname = \"became_active\"\n{event}\n{hook}"
            ));
            assert!(p.join("\n").contains(needle), "{event:?}: {p:?}");
        }
    }

    #[test]
    fn limits_are_checked() {
        let p = problems(&format!(
            "[[event]]\nname = \"e\"\ntable = \"t\"\non = [\"insert\"]\n[[webhook]]\nid = \"h\"\nevent = \"e\"\nurl = \"http://127.0.0.1/\"\nsecret = \"{SECRET}\"\ntimeout = \"0s\"\nmax_rows = 0\nmax_in_flight = 5000\n"
        ));
        let all = p.join("\n");
        for needle in [
            "timeout must be",
            "max_rows must be",
            "max_in_flight must be",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let config = load(&format!(
            "[[event]]\nname = \"e\"\ntable = \"t\"\non = [\"insert\"]\n[[webhook]]\nid = \"h\"\nevent = \"e\"\nurl = \"http://127.0.0.1/\"\nsecret = \"{SECRET}\"\n"
        ))
        .expect("valid");
        let debug = format!("{config:?}");
        assert!(!debug.contains("C2FVsBQ"), "{debug}");
    }

    #[test]
    fn table_names() {
        assert_eq!(
            TableName::parse("s.t"),
            Some(TableName {
                schema: "s".into(),
                name: "t".into()
            })
        );
        assert_eq!(
            TableName::parse("t").map(|t| t.to_string()),
            Some("public.t".into())
        );
        assert_eq!(TableName::parse(""), None);
        assert_eq!(TableName::parse("a."), None);
        assert_eq!(
            TableName::parse("My\"T").map(|t| t.quoted()),
            None,
            "quotes are refused rather than guessed"
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
