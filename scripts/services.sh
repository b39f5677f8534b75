#!/usr/bin/env bash
# scripts/services.sh — install, start, wait for and stop the real backend
# services the llmtap test suite talks to, on 127.0.0.1 only.
#
#   scripts/services.sh up [SVC...]     install what is missing, start what is not
#                                       running, wait until ready; one line per service
#   scripts/services.sh down            stop everything this script started
#   scripts/services.sh env             print `export VAR=...` lines for the tests
#   scripts/services.sh start SVC...    start one service (waits for readiness)
#   scripts/services.sh stop SVC...     stop one service for real (failure tests)
#   scripts/services.sh status          show what is running
#   scripts/services.sh install [SVC...] only install (no start)
#   scripts/services.sh clean           down + delete all state (not the caches)
#   scripts/services.sh browser         install Debian's chromium if missing (`up` with no
#                                       SVC does it too); the dashboard's browser tests use it
#   SVC is one of: postgres redis kafka s3 sqs
#
# Services (ports overridable by env):
#   postgres  PostgreSQL 15 (Debian postgresql-15), own cluster, trust auth   25432  LLMTAP_POSTGRES_PORT
#   redis     Redis 7 (Debian redis-server), own daemon + config              26379  LLMTAP_REDIS_PORT
#   kafka     Apache Kafka 4.1.1, KRaft combined broker+controller, jars from
#             Maven Central (scripts/kafka/pom.xml)                          29092  LLMTAP_KAFKA_PORT
#                                                           controller      29093  LLMTAP_KAFKA_CONTROLLER_PORT
#                                               SASL PLAIN (llmtap/...)     29094  LLMTAP_KAFKA_SASL_PORT
#   s3        SeaweedFS (master+volume+filer+S3 gateway in one `weed server`),
#             built from the Go module proxy                                 29000  LLMTAP_S3_PORT
#             internal ports 29101-29103 (http), 29111-29114 (grpc)  LLMTAP_S3_INTERNAL_PORT_BASE=29100
#   sqs       ElasticMQ 1.6.11 (SQS-compatible), jars from Maven Central
#             (scripts/elasticmq/pom.xml), messages kept in an H2 file so a
#             stop/start loses nothing                                      29500  LLMTAP_ELASTICMQ_PORT
#
# State (data dirs, logs, pid files) lives under $LLMTAP_SERVICES_DIR
# (default /tmp/llmtap-services); caches (kafka jars, the weed binary) under
# $LLMTAP_SERVICES_CACHE (default $HOME/.cache/llmtap-services); the Go module
# and build caches and ~/.m2 are the tools' usual ones.
#
# Measured on this project's 2-core / 24 GiB Debian 12 machine (2026-11-26),
# first run with empty caches (no ~/go/pkg/mod, ~/.cache/go-build, ~/.m2,
# no redis-server package):
#   redis-server apt install                  4-6 s
#   kafka 4.1.1 jars via mvn (53 jars, 44 MB) 44-56 s (runs in parallel with the weed build)
#   SeaweedFS go mod download (2.1 GB of modules) + go build (160 MB binary):
#                                             5 min 55 s on a lightly loaded machine,
#                                             12 min 40 s with other builds/benchmarks
#                                             holding the load average at ~7
#   => fresh `up`: ~7 min quiet, ~13-14 min under heavy load
#   cached `up` (services stopped): 15-20 s (kafka ~12 s, weed ~18 s, in parallel)
#   `up` when already running: ~3 s;  `down`: ~10 s
# Our ports lie in Linux's ephemeral range (32768-60999); as root the script adds
# them to net.ipv4.ip_local_reserved_ports so no client connection grabs them.
# Why SeaweedFS: first candidate in our list, a real S3 server (sigv4 auth,
# buckets, multipart) that builds from the Go module proxy alone. `go install
# ...@version` refuses it (its go.mod has a replace directive), so the script
# fetches the module with `go mod download` and runs `go build ./weed` in a
# scratch copy under the cache dir, keeping only the binary.
set -euo pipefail

# ---------------------------------------------------------------- settings
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_PATH="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
HOST=127.0.0.1
: "${HOME:=$(getent passwd "$(id -u)" | cut -d: -f6)}"
SERVICES_DIR="${LLMTAP_SERVICES_DIR:-/tmp/llmtap-services}"
CACHE_DIR="${LLMTAP_SERVICES_CACHE:-$HOME/.cache/llmtap-services}"
TIMEOUT="${LLMTAP_SERVICES_TIMEOUT:-120}"     # seconds per service readiness
RUN_DIR="$SERVICES_DIR/run"
ALL_SERVICES=(postgres redis kafka s3 sqs)

PG_PORT="${LLMTAP_POSTGRES_PORT:-25432}"
PG_BIN="${LLMTAP_PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DB=llmtap_test
PG_URL="postgresql://postgres@$HOST:$PG_PORT/$PG_DB"

REDIS_PORT="${LLMTAP_REDIS_PORT:-26379}"
REDIS_URL="redis://$HOST:$REDIS_PORT/0"

KAFKA_PORT="${LLMTAP_KAFKA_PORT:-29092}"
KAFKA_CONTROLLER_PORT="${LLMTAP_KAFKA_CONTROLLER_PORT:-29093}"
KAFKA_SASL_PORT="${LLMTAP_KAFKA_SASL_PORT:-$((KAFKA_PORT + 2))}"
KAFKA_SASL_USER=llmtap
KAFKA_SASL_PASSWORD=llmtap-kafka-secret
KAFKA_VERSION="${LLMTAP_KAFKA_VERSION:-4.1.1}"
KAFKA_HEAP="${LLMTAP_KAFKA_HEAP:-512m}"
KAFKA_BOOTSTRAP="$HOST:$KAFKA_PORT"

S3_PORT="${LLMTAP_S3_PORT:-29000}"
S3_BASE="${LLMTAP_S3_INTERNAL_PORT_BASE:-29100}"
S3_ACCESS_KEY=llmtap
S3_SECRET_KEY=llmtap-secret
S3_BUCKET=llmtap-test
S3_REGION=us-east-1
S3_ENDPOINT="http://$HOST:$S3_PORT"
SEAWEEDFS_MODULE=github.com/seaweedfs/seaweedfs
SEAWEEDFS_VERSION="${LLMTAP_SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
WEED_BIN="$CACHE_DIR/seaweedfs/$SEAWEEDFS_VERSION/weed"

SQS_PORT="${LLMTAP_ELASTICMQ_PORT:-29500}"
ELASTICMQ_VERSION="${LLMTAP_ELASTICMQ_VERSION:-1.6.11}"
ELASTICMQ_HEAP="${LLMTAP_ELASTICMQ_HEAP:-384m}"
SQS_ENDPOINT="http://$HOST:$SQS_PORT"

# Go lives in /usr/local/go on the dev/CI machines.
case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) PATH="$PATH:/usr/local/go/bin" ;; esac
export PATH

# ---------------------------------------------------------------- helpers
log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

is_root() { [ "$(id -u)" = 0 ]; }

# port_open PORT: something accepts TCP connections on $HOST:PORT
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# pid_alive PID MARKER: the process exists and its command line contains MARKER
# (guards against a stale pid file whose pid was reused by something else).
pid_alive() {
	local pid="$1" marker="$2"
	[ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker"
}

read_pidfile() { [ -s "$1" ] && head -n1 "$1" | tr -dc '0-9' || true; }

# kill_wait PID SECONDS: SIGTERM, wait, then SIGKILL.
kill_wait() {
	local pid="$1" secs="$2" i
	kill -TERM "$pid" 2>/dev/null || return 0
	for ((i = 0; i < secs * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
	log "pid $pid did not exit after ${secs}s, sending SIGKILL"
	kill -KILL "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.1
	done
}

# spawn PIDFILE LOGFILE CMD...: start CMD detached (own session, no tty, output
# to LOGFILE) and record its pid.
spawn() {
	local pidfile="$1" logfile="$2"
	shift 2
	rm -f "$pidfile"
	# 9>&-: the daemon must not inherit (and so keep holding) our flock fd.
	setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >>"$logfile" 2>&1 </dev/null 9>&- &
	local i
	for ((i = 0; i < 50; i++)); do [ -s "$pidfile" ] && return 0; sleep 0.1; done
	die "could not start $* (no pid file $pidfile)"
}

fail_not_ready() { # SVC LOGFILE WHY
	log "$1 did not become ready: $3"
	if [ -f "$2" ]; then
		printf '[services] ---- last 40 lines of %s ----\n' "$2" >&2
		tail -n 40 "$2" >&2 || true
		printf '[services] ---- end of %s ----\n' "$2" >&2
	fi
	stop_one "$1" >/dev/null 2>&1 || true
	die "$1 is not ready ($3); full log: $2"
}

# Some socket (other than a TIME-WAIT leftover) has PORT as its local port:
# e.g. a client connection that got it as its ephemeral port. That blocks our
# bind() just like a listener does.
# Closing states are left out: they are what a stopped server's own connections leave behind,
# and they inherited SO_REUSEADDR from its listener, so they do not block the new bind().
port_taken_by_client() {
	ss -Htan "( sport = :$1 )" 2>/dev/null | grep -qvE '^(TIME-WAIT|FIN-WAIT-1|FIN-WAIT-2|CLOSING|LAST-ACK|CLOSE-WAIT)'
}

ensure_port_free() { # SVC PORT...
	local svc="$1" p i
	shift
	for p in "$@"; do
		if port_open "$p"; then
			die "$svc: port $HOST:$p is already in use by another process (not started by this script): $(ss -ltnpH "sport = :$p" 2>/dev/null | head -n1)"
		fi
		if port_taken_by_client "$p"; then
			log "$svc: port $p is held as the local port of a client connection; waiting up to 60 s for it to close..."
			for ((i = 0; i < 600; i++)); do
				port_taken_by_client "$p" || break
				sleep 0.1
			done
			if port_taken_by_client "$p"; then
				die "$svc: port $p is still used by: $(ss -Htanp "( sport = :$p )" 2>/dev/null | head -n1)"
			fi
		fi
	done
}

# Our default ports lie below Linux's ephemeral range (32768-60999). A port inside it (an
# override, or a machine whose range is wider) is reserved, so the kernel never hands it to an
# outgoing connection: that would make our bind() fail with EADDRINUSE, and while the service
# is stopped a client reconnecting to it could get it as its own port and talk to itself (a
# TCP self-connect, which echoes every command back). Reserving needs a writable /proc/sys
# (root, not in every container); where it is not, say so.
reserve_ports() {
	local f=/proc/sys/net/ipv4/ip_local_reserved_ports cur want lo hi p inside=""
	read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { lo=32768 hi=60999; }
	for p in "$PG_PORT" "$REDIS_PORT" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT" "$S3_PORT" "$SQS_PORT" \
		"$S3_MASTER_PORT" "$S3_VOLUME_PORT" "$S3_FILER_PORT" "$S3_MASTER_GRPC" "$S3_VOLUME_GRPC" \
		"$S3_FILER_GRPC" "$S3_S3_GRPC"; do
		if [ "$p" -ge "$lo" ] && [ "$p" -le "$hi" ]; then inside="$inside $p"; fi
	done
	[ -n "$inside" ] || return 0
	if [ ! -w "$f" ]; then
		log "warning: ports$inside are in the ephemeral range $lo-$hi and $f is not writable;" \
			"a client of a stopped service may connect to itself (pick ports outside the range)"
		return 0
	fi
	want="$PG_PORT,$REDIS_PORT,$KAFKA_PORT,$KAFKA_CONTROLLER_PORT,$KAFKA_SASL_PORT,$S3_PORT,$SQS_PORT"
	want="$want,$S3_MASTER_PORT-$S3_FILER_PORT,$S3_MASTER_GRPC-$S3_S3_GRPC"
	cur=$(cat "$f" 2>/dev/null || true)
	echo "${cur:+$cur,}$want" >"$f" 2>/dev/null ||
		log "warning: could not reserve ports $want in $f"
}

APT_LOG=""
apt_install() { # PKG...
	local sudo=""
	if ! is_root; then
		command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to apt-get install $*"
		sudo="sudo -n"
	fi
	mkdir -p "$CACHE_DIR"
	APT_LOG="$CACHE_DIR/apt.log"
	local apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600)
	local pkg need_update=0
	for pkg in "$@"; do
		apt-cache show "$pkg" >/dev/null 2>&1 || need_update=1
	done
	if [ "$need_update" = 1 ]; then
		log "apt: package(s) $* not in the package lists, running apt-get update..."
		$sudo apt-get update -q >>"$APT_LOG" 2>&1 || true
	fi
	# Keep Debian's maintainer scripts from starting a system-wide daemon
	# (e.g. redis on 6379) on machines that have no policy-rc.d of their own.
	local policy=/usr/sbin/policy-rc.d made_policy=0
	if is_root && [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
	fi
	local rc=0
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install "${apt_opts[@]}" "$@" >>"$APT_LOG" 2>&1 || rc=$?
	if [ "$rc" != 0 ] && [ "$need_update" = 0 ]; then
		log "apt-get install failed, running apt-get update and retrying..."
		$sudo apt-get update -q >>"$APT_LOG" 2>&1 || true
		rc=0
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install "${apt_opts[@]}" "$@" >>"$APT_LOG" 2>&1 || rc=$?
	fi
	[ "$made_policy" = 1 ] && rm -f "$policy"
	if [ "$rc" != 0 ]; then
		tail -n 20 "$APT_LOG" >&2
		die "apt-get install $* failed (log: $APT_LOG)"
	fi
}

# The dashboard's browser tests drive Debian's chromium (no browser download at run time).
install_browser() {
	command -v chromium >/dev/null 2>&1 && return 0
	log "installing chromium from Debian (dashboard browser tests)..."
	apt_install chromium
}

svc_valid() {
	case "$1" in postgres | redis | kafka | s3 | sqs) return 0 ;; *) return 1 ;; esac
}

lock() {
	mkdir -p "$SERVICES_DIR" "$RUN_DIR"
	exec 9>"$SERVICES_DIR/.lock"
	flock -w 1200 9 || die "another services.sh is holding $SERVICES_DIR/.lock"
}

# ================================================================ postgres
PG_HOME="$SERVICES_DIR/postgres"
PG_DATA="$PG_HOME/data"
PG_SOCK="$PG_HOME/run"
PG_LOG="$PG_HOME/postgres.log"

as_pg() { if is_root; then runuser -u postgres -- "$@"; else "$@"; fi; }

postgres_installed() { [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/psql" ]; }
install_postgres() {
	postgres_installed && return 0
	local t0; t0=$(now)
	log "installing postgresql-15 from Debian (first run only, ~30 s)..."
	apt_install postgresql-15 postgresql-client-15
	postgres_installed || die "postgresql-15 installed but $PG_BIN/initdb is missing"
	log "postgres installed in $(since "$t0")s"
}

postgres_pid() {
	local pid
	pid=$(read_pidfile "$PG_DATA/postmaster.pid" 2>/dev/null)
	pid_alive "$pid" postgres && echo "$pid"
}

start_postgres() {
	install_postgres
	if is_root; then
		id postgres >/dev/null 2>&1 || die "user 'postgres' is missing (reinstall postgresql-common)"
	fi
	mkdir -p "$PG_HOME" "$PG_SOCK"
	is_root && chown postgres: "$PG_HOME" "$PG_SOCK"
	if is_root && ! runuser -u postgres -- test -x "$PG_HOME"; then
		die "user postgres cannot reach $PG_HOME: choose an LLMTAP_SERVICES_DIR that other users can traverse"
	fi
	if [ ! -s "$PG_DATA/PG_VERSION" ]; then
		log "postgres: initdb in $PG_DATA..."
		rm -rf "$PG_DATA"
		as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --no-locale --no-sync \
			>>"$PG_LOG" 2>&1 || fail_not_ready postgres "$PG_LOG" "initdb failed"
		cat >>"$PG_DATA/postgresql.conf" <<-EOF

			# ---- llmtap test settings (scripts/services.sh) ----
			listen_addresses = '$HOST'
			max_connections = 200
			fsync = off
			synchronous_commit = off
			full_page_writes = off
			log_min_messages = warning
		EOF
	fi
	ensure_port_free postgres "$PG_PORT"
	is_root && chown postgres: "$PG_LOG" 2>/dev/null || true
	# -W: don't wait here; wait_postgres does (so services start in parallel).
	as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -W \
		-o "-p $PG_PORT -c listen_addresses=$HOST -k $PG_SOCK" start >>"$PG_LOG" 2>&1 </dev/null 9>&- ||
		fail_not_ready postgres "$PG_LOG" "pg_ctl start failed"
}

postgres_ready() {
	"$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -U postgres -t 2 2>/dev/null
}

wait_postgres() {
	local t0=$SECONDS deadline=$((SECONDS + TIMEOUT))
	until postgres_ready; do
		if [ -z "$(postgres_pid)" ] && [ $((SECONDS - t0)) -ge 5 ]; then
			fail_not_ready postgres "$PG_LOG" "the server exited"
		fi
		[ $SECONDS -lt $deadline ] || fail_not_ready postgres "$PG_LOG" "timeout after ${TIMEOUT}s"
		sleep 0.2
	done
	local psql=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U postgres)
	if [ "$("${psql[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
		"${psql[@]}" -d postgres -c "CREATE DATABASE $PG_DB" >>"$PG_LOG" 2>&1 ||
			fail_not_ready postgres "$PG_LOG" "CREATE DATABASE $PG_DB failed"
	fi
	[ "$("${psql[@]}" -d "$PG_DB" -tAc 'SELECT 1')" = 1 ] || fail_not_ready postgres "$PG_LOG" "SELECT 1 failed"
	postgres_pid >"$RUN_DIR/postgres.pid" || true
}

stop_postgres() {
	local pid; pid=$(postgres_pid || true)
	if [ -n "$pid" ]; then
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >>"$PG_LOG" 2>&1 || kill_wait "$pid" 10
	fi
	rm -f "$RUN_DIR/postgres.pid"
	[ -n "$pid" ]
}

# ================================================================ redis
REDIS_HOME="$SERVICES_DIR/redis"
REDIS_LOG="$REDIS_HOME/redis.log"
REDIS_PIDFILE="$RUN_DIR/redis.pid"

redis_installed() { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; }
install_redis() {
	redis_installed && return 0
	local t0; t0=$(now)
	log "installing redis-server from Debian (first run only, ~5 s)..."
	apt_install redis-server redis-tools
	redis_installed || die "redis-server installed but not on PATH"
	log "redis installed in $(since "$t0")s"
}

redis_pid() { local pid; pid=$(read_pidfile "$REDIS_PIDFILE"); pid_alive "$pid" redis-server && echo "$pid"; }

start_redis() {
	install_redis
	mkdir -p "$REDIS_HOME/data"
	ensure_port_free redis "$REDIS_PORT"
	cat >"$REDIS_HOME/redis.conf" <<-EOF
		# generated by scripts/services.sh — llmtap test Redis
		bind $HOST
		port $REDIS_PORT
		protected-mode yes
		daemonize yes
		supervised no
		pidfile $REDIS_PIDFILE
		logfile $REDIS_LOG
		loglevel notice
		dir $REDIS_HOME/data
		dbfilename dump.rdb
		save 3600 1 300 100 60 10000
		stop-writes-on-bgsave-error no
		# As a durable queue should run: an append-only file, fsynced every second.
		appendonly yes
		appendfsync everysec
		databases 16
		maxmemory 512mb
		maxmemory-policy noeviction
	EOF
	rm -f "$REDIS_PIDFILE"
	redis-server "$REDIS_HOME/redis.conf" >>"$REDIS_LOG" 2>&1 </dev/null 9>&- ||
		fail_not_ready redis "$REDIS_LOG" "redis-server failed to start"
}

redis_ready() { [ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

wait_redis() {
	local t0=$SECONDS deadline=$((SECONDS + TIMEOUT))
	until redis_ready; do
		[ $SECONDS -lt $deadline ] || fail_not_ready redis "$REDIS_LOG" "timeout after ${TIMEOUT}s"
		if [ $((SECONDS - t0)) -ge 3 ] && [ -z "$(redis_pid)" ]; then
			fail_not_ready redis "$REDIS_LOG" "the server exited"
		fi
		sleep 0.1
	done
}

stop_redis() {
	local pid; pid=$(redis_pid || true)
	[ -n "$pid" ] && kill_wait "$pid" 30
	rm -f "$REDIS_PIDFILE"
	[ -n "$pid" ]
}

# ================================================================ kafka
KAFKA_HOME="$SERVICES_DIR/kafka"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_LOG="$KAFKA_HOME/stdout.log"
KAFKA_PIDFILE="$RUN_DIR/kafka.pid"
KAFKA_POM="$SCRIPT_DIR/kafka/pom.xml"

kafka_jars_dir() {
	local h; h=$(sha256sum "$KAFKA_POM" | cut -c1-12)
	echo "$CACHE_DIR/kafka/$KAFKA_VERSION-$h/jars"
}
kafka_installed() {
	[ -f "$(kafka_jars_dir)/.complete" ] && command -v java >/dev/null 2>&1
}
install_kafka() {
	kafka_installed && return 0
	local t0; t0=$(now)
	command -v java >/dev/null 2>&1 || { log "installing Java 17 from Debian..."; apt_install openjdk-17-jre-headless; }
	command -v mvn >/dev/null 2>&1 || { log "installing Maven from Debian..."; apt_install maven; }
	local jars; jars=$(kafka_jars_dir)
	[ -f "$jars/.complete" ] && return 0
	log "installing kafka $KAFKA_VERSION jars from Maven Central (first run only, ~60 s)..."
	local tmp="$jars.tmp.$$" mvnlog="$CACHE_DIR/kafka/mvn.log"
	mkdir -p "$(dirname "$jars")"
	rm -rf "$tmp"
	local repo_opt=()
	[ -n "${LLMTAP_MAVEN_REPO_LOCAL:-}" ] && repo_opt=("-Dmaven.repo.local=$LLMTAP_MAVEN_REPO_LOCAL")
	if ! mvn -B -q -f "$KAFKA_POM" "${repo_opt[@]}" -Dkafka.version="$KAFKA_VERSION" \
		dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
		tail -n 30 "$mvnlog" >&2
		rm -rf "$tmp"
		die "resolving the kafka jars failed (log: $mvnlog)"
	fi
	ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar "$tmp"/log4j-slf4j-impl-*.jar >/dev/null 2>&1 ||
		die "kafka jars incomplete in $tmp"
	touch "$tmp/.complete"
	rm -rf "$jars"
	mv "$tmp" "$jars"
	log "kafka jars installed in $(since "$t0")s ($(du -sh "$jars" | cut -f1))"
}

kafka_pid() { local pid; pid=$(read_pidfile "$KAFKA_PIDFILE"); pid_alive "$pid" "kafka.Kafka $KAFKA_HOME/server.properties" && echo "$pid"; }

kafka_java() { # CLASS ARGS... : run a Kafka tool on the broker's classpath
	java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2-tools.properties" \
		-cp "$(kafka_jars_dir)/*" "$@"
}

start_kafka() {
	install_kafka
	mkdir -p "$KAFKA_HOME/logs"
	ensure_port_free kafka "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_SASL_PORT"
	sed -e "s|@HOST@|$HOST|g; s|@PORT@|$KAFKA_PORT|g; s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g; s|@SASL_PORT@|$KAFKA_SASL_PORT|g; s|@DATA_DIR@|$KAFKA_DATA|g" \
		"$SCRIPT_DIR/kafka/server.properties.in" >"$KAFKA_HOME/server.properties"
	# The controller's address is written into the metadata log at format time:
	# reformat (test data only) when it or the Kafka version changed.
	local stamp="$KAFKA_VERSION $HOST:$KAFKA_CONTROLLER_PORT"
	if [ ! -f "$KAFKA_DATA/meta.properties" ] || [ "$(cat "$KAFKA_HOME/format.stamp" 2>/dev/null)" != "$stamp" ]; then
		local cid=""
		until [[ "$cid" == [A-Za-z0-9]* ]]; do
			cid=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
		done
		log "kafka: formatting KRaft storage in $KAFKA_DATA (cluster id $cid)..."
		rm -rf "$KAFKA_DATA"
		kafka_java kafka.tools.StorageTool format --standalone --cluster-id="$cid" \
			--config "$KAFKA_HOME/server.properties" >>"$KAFKA_LOG" 2>&1 ||
			fail_not_ready kafka "$KAFKA_LOG" "kafka-storage format failed"
		echo "$stamp" >"$KAFKA_HOME/format.stamp"
	fi
	echo "---- $(date -Is) starting kafka $KAFKA_VERSION" >>"$KAFKA_LOG"
	spawn "$KAFKA_PIDFILE" "$KAFKA_LOG" \
		java -Xms128m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
		-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
		-Dkafka.logs.dir="$KAFKA_HOME/logs" \
		-Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.properties" \
		-cp "$(kafka_jars_dir)/*" kafka.Kafka "$KAFKA_HOME/server.properties"
}

kafka_ready() {
	port_open "$KAFKA_PORT" || return 1
	# a real metadata round trip through the broker
	timeout 30 java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2-tools.properties" \
		-cp "$(kafka_jars_dir)/*" org.apache.kafka.tools.TopicCommand \
		--bootstrap-server "$KAFKA_BOOTSTRAP" --list >/dev/null 2>>"$KAFKA_HOME/logs/readiness.log" 9>&-
}

wait_kafka() {
	local deadline=$((SECONDS + TIMEOUT))
	until port_open "$KAFKA_PORT"; do
		[ -n "$(kafka_pid)" ] || fail_not_ready kafka "$KAFKA_HOME/logs/server.log" "the broker exited (see also $KAFKA_LOG)"
		[ $SECONDS -lt $deadline ] || fail_not_ready kafka "$KAFKA_HOME/logs/server.log" "timeout after ${TIMEOUT}s"
		sleep 0.2
	done
	until kafka_ready; do
		[ -n "$(kafka_pid)" ] || fail_not_ready kafka "$KAFKA_HOME/logs/server.log" "the broker exited (see also $KAFKA_LOG)"
		[ $SECONDS -lt $deadline ] || fail_not_ready kafka "$KAFKA_HOME/logs/server.log" "timeout after ${TIMEOUT}s (metadata check failed)"
		sleep 1
	done
}

stop_kafka() {
	local pid; pid=$(kafka_pid || true)
	[ -n "$pid" ] && kill_wait "$pid" 60
	rm -f "$KAFKA_PIDFILE"
	[ -n "$pid" ]
}

# ================================================================ s3 (SeaweedFS)
S3_HOME="$SERVICES_DIR/s3"
S3_LOG="$S3_HOME/stdout.log"
S3_PIDFILE="$RUN_DIR/s3.pid"
S3_MASTER_PORT=$((S3_BASE + 1)) S3_VOLUME_PORT=$((S3_BASE + 2)) S3_FILER_PORT=$((S3_BASE + 3))
S3_MASTER_GRPC=$((S3_BASE + 11)) S3_VOLUME_GRPC=$((S3_BASE + 12)) S3_FILER_GRPC=$((S3_BASE + 13)) S3_S3_GRPC=$((S3_BASE + 14))

s3_installed() { [ -x "$WEED_BIN" ] && command -v curl >/dev/null 2>&1; }
install_s3() {
	s3_installed && return 0
	command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
	[ -x "$WEED_BIN" ] && return 0
	command -v go >/dev/null 2>&1 || die "s3: Go (>= 1.26) is needed to build SeaweedFS; expected at /usr/local/go/bin/go"
	local t0; t0=$(now)
	local blog="$CACHE_DIR/seaweedfs/build.log"
	mkdir -p "$CACHE_DIR/seaweedfs"
	: >"$blog"
	log "installing SeaweedFS $SEAWEEDFS_VERSION: go mod download + go build (first run only, ~6 min on 2 cores)..."
	local json dir
	json=$(cd "$CACHE_DIR/seaweedfs" && GOFLAGS=-mod=mod go mod download -json "$SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION" 2>>"$blog") ||
		{ tail -n 20 "$blog" >&2; die "go mod download $SEAWEEDFS_MODULE@$SEAWEEDFS_VERSION failed (log: $blog)"; }
	dir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' | head -n1)
	[ -n "$dir" ] && [ -d "$dir/weed" ] || die "go mod download gave no source dir for $SEAWEEDFS_MODULE (got: $json)"
	# `go install mod@version` refuses modules whose go.mod has replace
	# directives, so build in a writable scratch copy of the module.
	local src="$CACHE_DIR/seaweedfs/src.$$"
	rm -rf "$src"
	cp -r "$dir" "$src"
	chmod -R u+w "$src"
	if ! (cd "$src" && GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' \
		-o "$WEED_BIN.tmp" ./weed) >>"$blog" 2>&1; then
		tail -n 30 "$blog" >&2
		chmod -R u+w "$src" 2>/dev/null; rm -rf "$src"
		die "building SeaweedFS failed (log: $blog)"
	fi
	rm -rf "$src"
	mkdir -p "$(dirname "$WEED_BIN")"
	mv "$WEED_BIN.tmp" "$WEED_BIN"
	log "SeaweedFS built in $(since "$t0")s: $("$WEED_BIN" version 2>/dev/null | head -n1)"
}

s3_pid() { local pid; pid=$(read_pidfile "$S3_PIDFILE"); pid_alive "$pid" "server -dir=$S3_HOME/data" && echo "$pid"; }
# weed also listens on unix sockets in /tmp named after the grpc ports
s3_rm_sockets() {
	rm -f "/tmp/seaweedfs-master-grpc-$S3_MASTER_GRPC.sock" "/tmp/seaweedfs-volume-grpc-$S3_VOLUME_GRPC.sock" \
		"/tmp/seaweedfs-filer-grpc-$S3_FILER_GRPC.sock" "/tmp/seaweedfs-s3-grpc-$S3_S3_GRPC.sock"
}

s3_curl() { # ARGS...: curl with AWS sigv4 signing by the test credentials
	curl -sS --max-time "${S3_CURL_TIMEOUT:-5}" --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" "$@"
}

start_s3() {
	install_s3
	mkdir -p "$S3_HOME/data" "$S3_HOME/master" "$S3_HOME/logs" "$S3_HOME/run"
	ensure_port_free s3 "$S3_PORT" "$S3_MASTER_PORT" "$S3_VOLUME_PORT" "$S3_FILER_PORT" \
		"$S3_MASTER_GRPC" "$S3_VOLUME_GRPC" "$S3_FILER_GRPC" "$S3_S3_GRPC"
	cat >"$S3_HOME/s3.json" <<-EOF
		{"identities": [{"name": "$S3_ACCESS_KEY",
		  "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
		  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
	EOF
	s3_rm_sockets
	echo "---- $(date -Is) starting weed server" >>"$S3_LOG"
	spawn "$S3_PIDFILE" "$S3_LOG" \
		"$WEED_BIN" -logdir="$S3_HOME/logs" server \
		-dir="$S3_HOME/data" -ip="$HOST" -ip.bind="$HOST" \
		-master.port="$S3_MASTER_PORT" -master.port.grpc="$S3_MASTER_GRPC" -master.dir="$S3_HOME/master" \
		-master.volumeSizeLimitMB=256 -master.telemetry=false -master.electionTimeout=2s \
		-volume.port="$S3_VOLUME_PORT" -volume.port.grpc="$S3_VOLUME_GRPC" -volume.max=16 -volume.preStopSeconds=0 \
		-filer -filer.port="$S3_FILER_PORT" -filer.port.grpc="$S3_FILER_GRPC" \
		-filer.localSocket="$S3_HOME/run/filer.sock" \
		-s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_S3_GRPC" -s3.config="$S3_HOME/s3.json" \
		-s3.localSocket="$S3_HOME/run/s3.sock" -s3.iam=false -s3.port.iceberg=0 -s3.port.lance=0
}

s3_ready() { # bucket exists (create it if needed) and a put/get round trip works
	port_open "$S3_PORT" || return 1
	local code
	code=$(s3_curl -o /dev/null -w '%{http_code}' -X PUT "$S3_ENDPOINT/$S3_BUCKET" 2>/dev/null) || return 1
	case "$code" in 200 | 409) ;; *) return 1 ;; esac
	local key=".llmtap-services/ready-$$" body got file="$S3_HOME/run/ready-$$.txt"
	body="ready $$ $(date +%s%N)"
	# upload from a file (-T): curl's sigv4 signing of --data bodies is not
	# accepted by SeaweedFS (SignatureDoesNotMatch).
	printf '%s' "$body" >"$file"
	s3_curl -f -o /dev/null -T "$file" "$S3_ENDPOINT/$S3_BUCKET/$key" 2>/dev/null || { rm -f "$file"; return 1; }
	rm -f "$file"
	got=$(s3_curl -f "$S3_ENDPOINT/$S3_BUCKET/$key" 2>/dev/null) || return 1
	s3_curl -f -o /dev/null -X DELETE "$S3_ENDPOINT/$S3_BUCKET/$key" 2>/dev/null || true
	[ "$got" = "$body" ]
}

wait_s3() {
	local deadline=$((SECONDS + TIMEOUT))
	until s3_ready; do
		[ -n "$(s3_pid)" ] || fail_not_ready s3 "$S3_LOG" "weed server exited"
		[ $SECONDS -lt $deadline ] || fail_not_ready s3 "$S3_LOG" "timeout after ${TIMEOUT}s (bucket/round-trip check failed)"
		sleep 0.5
	done
}

stop_s3() {
	local pid; pid=$(s3_pid || true)
	[ -n "$pid" ] && kill_wait "$pid" 30
	rm -f "$S3_PIDFILE"
	[ -z "$pid" ] || s3_rm_sockets
	[ -n "$pid" ]
}

# ================================================================ sqs (ElasticMQ)
SQS_HOME="$SERVICES_DIR/sqs"
SQS_LOG="$SQS_HOME/stdout.log"
SQS_PIDFILE="$RUN_DIR/sqs.pid"
ELASTICMQ_POM="$SCRIPT_DIR/elasticmq/pom.xml"

elasticmq_lib_dir() {
	local h; h=$(sha256sum "$ELASTICMQ_POM" | cut -c1-12)
	echo "$CACHE_DIR/elasticmq/$ELASTICMQ_VERSION-$h/lib"
}
sqs_installed() { [ -f "$(elasticmq_lib_dir)/.complete" ] && command -v java >/dev/null 2>&1; }
install_sqs() {
	sqs_installed && return 0
	local t0; t0=$(now)
	command -v java >/dev/null 2>&1 || { log "installing Java 17 from Debian..."; apt_install openjdk-17-jre-headless; }
	command -v mvn >/dev/null 2>&1 || { log "installing Maven from Debian..."; apt_install maven; }
	local lib; lib=$(elasticmq_lib_dir)
	log "installing ElasticMQ $ELASTICMQ_VERSION jars from Maven Central (first run only)..."
	local tmp="$lib.tmp.$$" mvnlog="$CACHE_DIR/elasticmq/mvn.log"
	mkdir -p "$(dirname "$lib")"
	rm -rf "$tmp"
	local repo_opt=()
	[ -n "${LLMTAP_MAVEN_REPO_LOCAL:-}" ] && repo_opt=("-Dmaven.repo.local=$LLMTAP_MAVEN_REPO_LOCAL")
	if ! mvn -B -q -f "$ELASTICMQ_POM" "${repo_opt[@]}" -Delasticmq.version="$ELASTICMQ_VERSION" \
		dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
		tail -n 30 "$mvnlog" >&2
		rm -rf "$tmp"
		die "resolving the ElasticMQ jars failed (log: $mvnlog)"
	fi
	ls "$tmp"/elasticmq-server_2.13-"$ELASTICMQ_VERSION".jar "$tmp"/h2-*.jar >/dev/null 2>&1 ||
		die "ElasticMQ jars incomplete in $tmp"
	touch "$tmp/.complete"
	rm -rf "$lib"
	mv "$tmp" "$lib"
	log "ElasticMQ jars installed in $(since "$t0")s ($(du -sh "$lib" | cut -f1))"
}

sqs_pid() { local pid; pid=$(read_pidfile "$SQS_PIDFILE"); pid_alive "$pid" "-Dconfig.file=$SQS_HOME/elasticmq.conf" && echo "$pid"; }

start_sqs() {
	install_sqs
	mkdir -p "$SQS_HOME/data"
	ensure_port_free sqs "$SQS_PORT"
	# Queues (queues.conf) and messages (an H2 file) persist, so that stopping the server in
	# a failure test is an outage, not a loss. No rest-stats port: one port to reserve.
	# H2 options: DB_CLOSE_ON_EXIT=FALSE, or the JVM's shutdown hook closes the store while
	# ElasticMQ still accepts sends; WRITE_DELAY=0, or H2 keeps the last 500 ms of commits
	# (sends already answered 200) in memory and a stop loses them (40-73 of ~2,000 measured;
	# tests/test_sqs_queue.py::test_acknowledged_sends_survive_a_broker_stop_with_sends_in_flight).
	cat >"$SQS_HOME/elasticmq.conf" <<-EOF
		# generated by scripts/services.sh: llmtap test ElasticMQ
		include classpath("application.conf")
		node-address {
		  protocol = "http"
		  host = "$HOST"
		  port = $SQS_PORT
		  context-path = ""
		}
		rest-sqs {
		  enabled = true
		  bind-port = $SQS_PORT
		  bind-hostname = "$HOST"
		  sqs-limits = strict
		}
		rest-stats {
		  enabled = false
		}
		generate-node-address = false
		queues-storage {
		  enabled = true
		  path = "$SQS_HOME/data/queues.conf"
		}
		messages-storage {
		  enabled = true
		  uri = "jdbc:h2:$SQS_HOME/data/messages;DB_CLOSE_ON_EXIT=FALSE;WRITE_DELAY=0"
		}
	EOF
	echo "---- $(date -Is) starting ElasticMQ $ELASTICMQ_VERSION" >>"$SQS_LOG"
	spawn "$SQS_PIDFILE" "$SQS_LOG" \
		java -Xms64m -Xmx"$ELASTICMQ_HEAP" -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError \
		-Djava.awt.headless=true -Dconfig.file="$SQS_HOME/elasticmq.conf" \
		-cp "$(elasticmq_lib_dir)/*" org.elasticmq.server.Main
}

sqs_ready() { # a real SQS call: ListQueues answers 200
	port_open "$SQS_PORT" || return 1
	curl -sf --max-time 5 -o /dev/null -X POST "$SQS_ENDPOINT/" \
		-H 'content-type: application/x-www-form-urlencoded' --data 'Action=ListQueues&Version=2012-11-05'
}

wait_sqs() {
	local deadline=$((SECONDS + TIMEOUT))
	until sqs_ready; do
		[ -n "$(sqs_pid)" ] || fail_not_ready sqs "$SQS_LOG" "the server exited"
		[ $SECONDS -lt $deadline ] || fail_not_ready sqs "$SQS_LOG" "timeout after ${TIMEOUT}s"
		sleep 0.3
	done
}

stop_sqs() {
	local pid; pid=$(sqs_pid || true)
	[ -n "$pid" ] && kill_wait "$pid" 30
	rm -f "$SQS_PIDFILE"
	[ -n "$pid" ]
}

# ================================================================ dispatch
svc_pid() { "${1}_pid" 2>/dev/null || true; }

svc_desc() {
	case "$1" in
	postgres) echo "$PG_URL" ;;
	redis) echo "$REDIS_URL" ;;
	kafka) echo "$KAFKA_BOOTSTRAP (controller $HOST:$KAFKA_CONTROLLER_PORT, kafka $KAFKA_VERSION)" ;;
	s3) echo "$S3_ENDPOINT bucket=$S3_BUCKET (SeaweedFS)" ;;
	sqs) echo "$SQS_ENDPOINT (ElasticMQ $ELASTICMQ_VERSION)" ;;
	esac
}

svc_ready() { "${1}_ready"; }

stop_one() {
	local svc="$1"
	if "stop_$svc"; then
		printf '%-8s stopped\n' "$svc"
	else
		printf '%-8s not running\n' "$svc"
	fi
}

# start_many SVC...: launch everything that is not running, then wait for each.
start_many() {
	local svc state
	declare -A t_start=()
	reserve_ports
	for svc in "$@"; do
		if [ -n "$(svc_pid "$svc")" ]; then
			continue
		fi
		t_start[$svc]=$(now)
		log "starting $svc..."
		"start_$svc"
	done
	for svc in "$@"; do
		if [ -n "${t_start[$svc]:-}" ]; then
			"wait_$svc"
			state="ready    (started in $(since "${t_start[$svc]}")s)"
		else
			if ! svc_ready "$svc"; then
				log "$svc is running (pid $(svc_pid "$svc")) but not ready yet, waiting..."
				"wait_$svc"
			fi
			state="ready    (already running)"
		fi
		printf '%-8s %s pid=%s %s\n' "$svc" "$state" "$(svc_pid "$svc")" "$(svc_desc "$svc")"
	done
}

install_many() {
	local svc need_kafka=0 need_s3=0 kpid="" klog="$CACHE_DIR/kafka/install.log"
	for svc in "$@"; do
		case "$svc" in
		kafka) kafka_installed || need_kafka=1 ;;
		s3) [ -x "$WEED_BIN" ] || need_s3=1 ;;
		esac
	done
	# apt installs first (they are quick and need the dpkg lock), then the
	# kafka jars in the background while SeaweedFS builds.
	for svc in "$@"; do
		case "$svc" in postgres) install_postgres ;; redis) install_redis ;; esac
	done
	for svc in "$@"; do
		case "$svc" in sqs) install_sqs ;; esac
	done
	if [ "$need_kafka" = 1 ] && [ "$need_s3" = 1 ]; then
		command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
		command -v mvn >/dev/null 2>&1 || apt_install maven
		command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
		mkdir -p "$(dirname "$klog")"
		(install_kafka) >"$klog" 2>&1 &
		kpid=$!
		install_s3
		if ! wait "$kpid"; then
			cat "$klog" >&2
			die "installing kafka failed"
		fi
		cat "$klog" >&2
	else
		for svc in "$@"; do
			case "$svc" in kafka) install_kafka ;; s3) install_s3 ;; esac
		done
	fi
}

parse_services() { # -> SERVICES array
	SERVICES=()
	local s
	if [ $# -eq 0 ]; then SERVICES=("${ALL_SERVICES[@]}"); return; fi
	for s in "$@"; do
		svc_valid "$s" || die "unknown service '$s' (expected: ${ALL_SERVICES[*]})"
		SERVICES+=("$s")
	done
}

cmd_env() {
	cat <<-EOF
		export LLMTAP_TEST_POSTGRES_URL=$PG_URL
		export LLMTAP_TEST_REDIS_URL=$REDIS_URL
		export LLMTAP_TEST_KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP
		export LLMTAP_TEST_KAFKA_SASL_URL=kafka://$KAFKA_SASL_USER:$KAFKA_SASL_PASSWORD@$HOST:$KAFKA_SASL_PORT
		export LLMTAP_TEST_S3_ENDPOINT=$S3_ENDPOINT
		export LLMTAP_TEST_S3_ACCESS_KEY=$S3_ACCESS_KEY
		export LLMTAP_TEST_S3_SECRET_KEY=$S3_SECRET_KEY
		export LLMTAP_TEST_S3_BUCKET=$S3_BUCKET
		export LLMTAP_TEST_S3_REGION=$S3_REGION
		export LLMTAP_TEST_SQS_ENDPOINT=$SQS_ENDPOINT
		export LLMTAP_SERVICES_DIR=$SERVICES_DIR
		export LLMTAP_SERVICES_SCRIPT=$SCRIPT_PATH
	EOF
}

cmd_status() {
	local svc pid rc=0
	for svc in "${ALL_SERVICES[@]}"; do
		pid=$(svc_pid "$svc")
		if [ -z "$pid" ]; then
			printf '%-8s stopped\n' "$svc"; rc=3
		elif svc_ready "$svc" >/dev/null 2>&1; then
			printf '%-8s ready    pid=%s %s\n' "$svc" "$pid" "$(svc_desc "$svc")"
		else
			printf '%-8s running  pid=%s (not ready) %s\n' "$svc" "$pid" "$(svc_desc "$svc")"; rc=3
		fi
	done
	return $rc
}

usage() {
	sed -n '2,14p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//' >&2
	exit 2
}

main() {
	local cmd="${1:-}"
	[ $# -gt 0 ] && shift
	case "$cmd" in
	up)
		parse_services "$@"
		lock
		local t0; t0=$(now)
		[ $# -eq 0 ] && install_browser
		install_many "${SERVICES[@]}"
		start_many "${SERVICES[@]}"
		log "up: ${SERVICES[*]} ready in $(since "$t0")s (state: $SERVICES_DIR)"
		;;
	start)
		[ $# -gt 0 ] || die "usage: $0 start postgres|redis|kafka|s3|sqs ..."
		parse_services "$@"
		lock
		install_many "${SERVICES[@]}"
		start_many "${SERVICES[@]}"
		;;
	stop)
		[ $# -gt 0 ] || die "usage: $0 stop postgres|redis|kafka|s3|sqs ..."
		parse_services "$@"
		lock
		local svc
		for svc in "${SERVICES[@]}"; do stop_one "$svc"; done
		;;
	down)
		lock
		local svc
		for svc in sqs s3 kafka redis postgres; do stop_one "$svc"; done
		;;
	clean)
		lock
		local svc
		for svc in sqs s3 kafka redis postgres; do stop_one "$svc"; done
		rm -rf "$PG_HOME" "$REDIS_HOME" "$KAFKA_HOME" "$S3_HOME" "$SQS_HOME" "$RUN_DIR"
		log "removed the state under $SERVICES_DIR (caches in $CACHE_DIR kept)"
		;;
	install)
		parse_services "$@"
		lock
		install_many "${SERVICES[@]}"
		;;
	browser) install_browser ;;
	env) cmd_env ;;
	status) cmd_status ;;
	-h | --help | help) usage ;;
	*) usage ;;
	esac
}

main "$@"
