#!/usr/bin/env bash
# walhook end to end on a throwaway database: starts a temporary PostgreSQL cluster, a
# receiver that verifies signatures and prints what arrives, and walhook; makes some
# changes; shows the notifications and the delivery log; cleans everything up.
#
#   bash examples/demo.sh
#
# Needs the PostgreSQL server package (apt-get install -y postgresql) and a Rust toolchain.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
echo "== building walhook and the demo receiver"
cargo build --quiet --bin walhook --example receiver
walhook="$here/target/debug/walhook"
receiver="$here/target/debug/examples/receiver"

bindir=$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)
work=$(mktemp -d /tmp/walhook-demo.XXXXXX)
pids=()
as_pg() {
    # initdb refuses to run as root: run the server tools as the postgres user then.
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    as_pg "$bindir/pg_ctl" -D "$work/pg" stop -m immediate >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] && chown postgres "$work"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
hook_port=$(free_port)

echo "== starting a throwaway PostgreSQL on 127.0.0.1:$pg_port (wal_level=logical)"
as_pg "$bindir/initdb" -D "$work/pg" -A trust -U postgres --no-sync >/dev/null
as_pg "$bindir/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w start \
    -o "-c wal_level=logical -c port=$pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work" >/dev/null
url="postgresql://postgres@127.0.0.1:$pg_port/postgres"
sql() { psql -q -X -v ON_ERROR_STOP=1 "$url" -c "$1"; }
sql "CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL, status text NOT NULL);
     CREATE TABLE order_lines (order_id int, line int, sku text, PRIMARY KEY (order_id, line));
     CREATE TABLE contracts (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers);
     CREATE INDEX ON contracts (customer_id);
     INSERT INTO customers VALUES (9, 'old@example.com', 'active');"

# A classification: which customers are active (the existing customer 9 is baselined
# silently; transitions are reported).
mkdir -p "$work/classifications"
cat > "$work/classifications/customer_active.sql" <<'EOF'
-- A customer is active when its status is 'active'.
SELECT id FROM public.customers WHERE status = 'active'
EOF

secret="whsec_$(head -c 24 /dev/urandom | base64)"
echo "== starting the receiver on 127.0.0.1:$hook_port"
"$receiver" "127.0.0.1:$hook_port" "$secret" > "$work/received.txt" 2>"$work/receiver.log" &
pids+=($!)

cat > "$work/walhook.toml" <<EOF
[[event]]
name = "customer_changed"
table = "public.customers"
on = ["insert", "update", "delete"]

[[event]]
name = "order_line_added"
table = "public.order_lines"
on = ["insert"]

[[event]]
name = "customer_activity"
classification = "customer_active"
from = "any"
to = "any"

[[event]]
name = "customer_contract_linked"
table = "public.customers"
relation = "contracts_customer_id_fkey"
on = ["relation_added", "relation_removed"]

[[webhook]]
id = "crm-sync"
event = "customer_changed"
url = "http://127.0.0.1:$hook_port/hooks/customers"
secret_env = "DEMO_SECRET"

[[webhook]]
id = "fulfilment"
event = "order_line_added"
url = "http://127.0.0.1:$hook_port/hooks/orders"
secret_env = "DEMO_SECRET"

[[webhook]]
id = "lifecycle"
event = "customer_activity"
url = "http://127.0.0.1:$hook_port/hooks/lifecycle"
secret_env = "DEMO_SECRET"

[[webhook]]
id = "contracts"
event = "customer_contract_linked"
url = "http://127.0.0.1:$hook_port/hooks/contracts"
secret_env = "DEMO_SECRET"
EOF

echo "== walhook check"
DEMO_SECRET="$secret" "$walhook" check --database-url "$url" --config "$work/walhook.toml" \
    --classifications "$work/classifications"

echo "== starting walhook run"
DEMO_SECRET="$secret" RUST_LOG=info "$walhook" run --database-url "$url" \
    --data-dir "$work/data" --config "$work/walhook.toml" \
    --classifications "$work/classifications" 2>"$work/walhook.log" &
walhook_pid=$!
pids+=($walhook_pid)
for _ in $(seq 100); do grep -q streaming "$work/walhook.log" && break; sleep 0.1; done

echo "== making changes"
sql "INSERT INTO customers VALUES (1, 'ada@example.com', 'trial'), (2, 'bob@example.com', 'trial');"
sql "BEGIN; UPDATE customers SET status = 'active' WHERE id = 1; DELETE FROM customers WHERE id = 2; COMMIT;"
sql "INSERT INTO order_lines VALUES (7, 1, 'tea'), (7, 2, 'cups');"
sql "UPDATE customers SET email = 'ada@lovelace.example' WHERE id = 1;"
sql "BEGIN; UPDATE customers SET status = 'paused' WHERE id = 9; INSERT INTO contracts VALUES (70, 9); COMMIT;"

for _ in $(seq 100); do [ "$(wc -l < "$work/received.txt")" -ge 11 ] && break; sleep 0.1; done
echo "== what the receiver got (signature verified on each)"
cat "$work/received.txt"

echo "== stopping walhook (SIGTERM: flush, acknowledge, exit 0)"
kill -TERM "$walhook_pid"
wait "$walhook_pid" && echo "walhook exited with status 0"
echo "== slot position after shutdown"
psql -X -A -t "$url" -c "SELECT slot_name || ' confirmed at ' || confirmed_flush_lsn || ', server at ' || pg_current_wal_lsn() FROM pg_replication_slots"
echo "== delivery log: pending or dead notifications"
"$walhook" deliveries --data-dir "$work/data" list
