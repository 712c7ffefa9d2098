#!/bin/bash
# The IRC rows of docs/performance.md: fan-out to 1000 clients (nc, IRC, a
# third each of nc/JSON/IRC, and ngIRCd), three rounds, then registering
# 10000 clients (nc, IRC, ngIRCd, the last stopped after 10 minutes).
# Run from the repository's top: bash bench/irc_compare.sh > irc.out
# Needs Debian's ngircd (apt-get install ngircd); it listens on 127.0.0.1:6699.
# --concurrency 10 everywhere: ngIRCd listens with a backlog of 10.
CONF="$PWD/bench/ngircd.conf"
FAN="--clients 1000 --senders 10 --rate 20 --duration 10 --concurrency 10"
REG="--clients 10000 --senders 1 --messages 1 --concurrency 10"
NGIRCD_DIR=$(mktemp -d)
ng_start() { pkill -x ngircd; sleep 1; (cd "$NGIRCD_DIR" && ngircd -n -f "$CONF" >/dev/null 2>&1 &); sleep 1; }
for round in 1 2 3; do
  echo "== round $round"
  echo -n "text "; python3 chat.py bench $FAN --json 2>/dev/null | tail -1
  echo -n "irc "; python3 chat.py bench $FAN --irc --json 2>/dev/null | tail -1
  echo -n "mix "; python3 chat.py bench $FAN --mix text,json,irc --json 2>/dev/null | tail -1
  ng_start
  echo -n "ngircd "; python3 chat.py bench $FAN --irc --port 6699 --json 2>/dev/null | tail -1
  pkill -x ngircd
done
echo "== registering"
echo -n "reg-text "; python3 chat.py bench $REG --json 2>/dev/null | tail -1
echo -n "reg-irc "; python3 chat.py bench $REG --irc --json 2>/dev/null | tail -1
ng_start
echo "reg-ngircd (its progress, one line a second)"
timeout 600 python3 chat.py bench $REG --irc --port 6699 --timeout 60 2>&1 | tr '\r' '\n' | grep -v '^$'
echo "ngircd RSS KB: $(ps -o rss= -C ngircd)"
pkill -x ngircd
rm -rf "$NGIRCD_DIR"
