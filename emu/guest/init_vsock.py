"""/init's `vsock` workload (busybox ash + Debian's socat): streams through virtio-vsock.

Appended to init_script.INIT before its main loop, so it can use the helpers there
(`arg`, `result`, `warn`, `sha`, `now_ns`). The image needs the socat layer
(images.SOCAT_LIBDIR), which run_guest adds for this workload. The host side is a
hybrid vsock (Firecracker's convention, emu.guest.vsock): the guest's connect to CID 2
port P reaches the host's Unix socket `PATH_P`; a host program reaches a guest listener
on port P by connecting to `PATH` and writing `CONNECT P`.

Passes (`emu.vsock.do=`, comma-separated, run in order; each prints
`EMU-RESULT vsock.<pass>.rc`):

- `connect`: `conns` (4) connections at once to host port `port` (5000), each sending its
  own `kib` (1024) KiB of random data and reading it back (the host echoes); prints each
  connection's sha256 as `vsock.connect.<i>` (the host compares what it received) and
  `vsock.connect_bad` (echoes that differ).
- `serve`: starts an echo listener on `listen` (6000) in the background (`fork`: any
  number of host connections at once) and prints `EMU-VSOCK listening <port>`; it runs
  until the workload ends.
- `wait`: waits (up to `wait_s`, 120 s) until the host connects to `listen` + 1 and
  closes: the host's "done" (prints `vsock.done`, the bytes it sent).
- `slowhost`: sends `slow_mib` (16) MiB to host port `slow_port` (5001) in 256 KiB
  chunks, printing `EMU-ITER s <chunks>` as each chunk enters socat's pipe: a host that
  does not read sees the count stop where flow control stopped the guest. Prints
  `vsock.slowhost_sha256`.
- `slowguest`: accepts one connection on `slow_listen` (6100) but reads nothing until the
  host connects to `slow_listen` + 1; then the sha256 of everything the connection
  brought goes back to the host on it and to the console (`vsock.slowguest_sha256`).
- `reset`: holds a connection to host port `port` open, a line every 0.2 s, until it
  breaks (the host restores the device: TRANSPORT_RESET), then connects again until the
  echo of one line comes back (up to `reset_s`, 60 s). Prints `vsock.reset_rc` (socat's
  status, non-zero when the connection was reset), `vsock.reset_error` (its error
  line), `vsock.reset_ticks` (lines echoed before the break), `vsock.reconnect_tries`,
  `vsock.reconnected` (1 when the echo came back).
- `tx` / `rx` (benches): `tx` sends `mib` (64) MiB of zeros to host port `tx_port`
  (5002); `rx` accepts one connection on `rx_port` (6200) and discards what it brings.
  The host times both.
- `net`: puts `net_ip` (10.0.7.2/24) on eth0 and makes the later passes use TCP to
  `net_peer` (10.0.7.1) instead of vsock (same ports), for the virtio-net comparison.
"""

VSOCK_WORKLOAD = r"""
vsocat() { LD_LIBRARY_PATH=/usr/lib/emu-socat socat "$@"; }

vs_connect() {  # vs_connect PORT: socat's address of the host's PORT
  if [ "$VS_VIA" = tcp ]; then echo "TCP:$VS_PEER:$1"; else echo "VSOCK-CONNECT:2:$1"; fi
}

vs_listen() {  # vs_listen PORT [OPTIONS]: socat's address of a listener on PORT
  if [ "$VS_VIA" = tcp ]; then echo "TCP-LISTEN:$1,reuseaddr$2"; else echo "VSOCK-LISTEN:$1$2"; fi
}

vsock_connect() {  # connections at once, each echoed back by the host and compared
  local n kib port i=0 bad=0 pids=
  n=$(arg emu.vsock.conns 4); kib=$(arg emu.vsock.kib 1024); port=$(arg emu.vsock.port 5000)
  dd if=/dev/urandom of=/tmp/vs.src bs=1K count=$((n * kib)) 2>/dev/null || return 1
  while [ $i -lt "$n" ]; do
    dd if=/tmp/vs.src of=/tmp/vs.d$i bs=1K skip=$((i * kib)) count="$kib" 2>/dev/null
    vsocat -t 30 -b 65536 STDIO "$(vs_connect "$port")" < /tmp/vs.d$i > /tmp/vs.e$i \
      2> /tmp/vs.x$i &
    pids="$pids $!"
    i=$((i + 1))
  done
  wait $pids
  i=0
  while [ $i -lt "$n" ]; do
    result vsock.connect.$i "$(sha < /tmp/vs.d$i)"
    if ! cmp -s /tmp/vs.d$i /tmp/vs.e$i; then
      bad=$((bad + 1))
      warn "connection $i: echo of $(wc -c < /tmp/vs.e$i) bytes differs: $(head -c 200 /tmp/vs.x$i)"
    fi
    rm -f /tmp/vs.d$i /tmp/vs.e$i /tmp/vs.x$i
    i=$((i + 1))
  done
  rm -f /tmp/vs.src
  result vsock.connect_bad $bad
  [ $bad = 0 ]
}

vsock_serve() {  # an echo listener for the host, in the background until the workload ends
  local port
  port=$(arg emu.vsock.listen 6000)
  vsocat -t 30 "$(vs_listen "$port" ,fork)" EXEC:cat &
  VS_SERVER="$VS_SERVER $!"
  sleep 0.2
  kill -0 $! 2>/dev/null || { warn "the listener on $port did not start"; return 1; }
  echo "EMU-VSOCK listening $port"
}

vsock_wait() {  # until the host says it is done (a connection to listen + 1)
  local port
  port=$(($(arg emu.vsock.listen 6000) + 1))
  echo "EMU-VSOCK waiting $port"
  timeout "$(arg emu.vsock.wait_s 120)" \
    sh -c "LD_LIBRARY_PATH=/usr/lib/emu-socat socat -u $(vs_listen $port) STDOUT" > /tmp/vs.done ||
    { warn "the host never said done on $port"; return 1; }
  result vsock.done "$(wc -c < /tmp/vs.done)"
}

vsock_slowhost() {  # a stream to a host that may not read: progress per 256 KiB chunk
  local mib port chunks i=0
  mib=$(arg emu.vsock.slow_mib 16); port=$(arg emu.vsock.slow_port 5001)
  chunks=$((mib * 4))
  dd if=/dev/urandom of=/tmp/vs.slow bs=1M count="$mib" 2>/dev/null || return 1
  result vsock.slowhost_sha256 "$(sha < /tmp/vs.slow)"
  (while [ $i -lt $chunks ]; do
    dd if=/tmp/vs.slow bs=256k skip=$i count=1 2>/dev/null || exit 1
    i=$((i + 1))
    echo "EMU-ITER s $i" >&2
  done) | vsocat -u -b 65536 STDIN "$(vs_connect "$port")" || { rm -f /tmp/vs.slow; return 1; }
  rm -f /tmp/vs.slow
}

vsock_slowguest() {  # a listener that reads nothing until the host's go (a connection)
  local port go
  port=$(arg emu.vsock.slow_listen 6100); go=$((port + 1))
  # the reader, a script: socat takes ':' in a SYSTEM command for its own
  cat > /tmp/vs.reader <<EOF
socat -u $(vs_listen $go) STDOUT > /dev/null
sha256sum | tee /tmp/vs.slowsha
EOF
  echo "EMU-VSOCK listening $port"
  vsocat -t 30 "$(vs_listen "$port")" EXEC:"sh /tmp/vs.reader" || return 1
  result vsock.slowguest_sha256 "$(cut -d' ' -f1 < /tmp/vs.slowsha)"
  rm -f /tmp/vs.slowsha /tmp/vs.reader
}

vsock_reset() {  # a connection broken by the host's restore, then a new one that works
  local port rc tries=0 deadline got
  port=$(arg emu.vsock.port 5000)
  (n=0; while :; do n=$((n + 1)); echo "tick $n"; sleep 0.2; done) |
    vsocat -t 5 STDIO "$(vs_connect "$port")" > /tmp/vs.ticks 2> /tmp/vs.rerr; rc=$?
  result vsock.reset_rc $rc
  result vsock.reset_error "$(grep -m 1 ' E ' /tmp/vs.rerr | sed 's/.* E //')"
  result vsock.reset_ticks "$(grep -c '^tick' /tmp/vs.ticks)"
  deadline=$(($(cut -d. -f1 /proc/uptime) + $(arg emu.vsock.reset_s 60)))
  while [ "$(cut -d. -f1 /proc/uptime)" -lt $deadline ]; do
    tries=$((tries + 1))
    got=$(echo after-reset | vsocat -t 10 STDIO "$(vs_connect "$port")" 2>/dev/null)
    if [ "$got" = after-reset ]; then
      result vsock.reconnect_tries $tries
      result vsock.reconnected 1
      return 0
    fi
    sleep 0.2
  done
  result vsock.reconnect_tries $tries
  result vsock.reconnected 0
  return 1
}

vsock_tx() {  # bench: zeros to the host, which times them
  local mib
  mib=$(arg emu.vsock.mib 64)
  dd if=/dev/zero bs=64k count=$((mib * 16)) 2>/dev/null |
    vsocat -u -b 65536 STDIN "$(vs_connect "$(arg emu.vsock.tx_port 5002)")"
}

vsock_rx() {  # bench: one connection from the host, discarded; the host times it
  local port
  port=$(arg emu.vsock.rx_port 6200)
  echo "EMU-VSOCK listening $port"
  vsocat -u -b 65536 "$(vs_listen "$port")" STDOUT > /dev/null
}

vsock_net() {  # later passes go through TCP on eth0 instead of vsock
  local ifc=eth0
  wait_for /sys/class/net/$ifc || return 1
  ip link set lo up
  ip link set $ifc up && ip addr add "$(arg emu.vsock.net_ip 10.0.7.2/24)" dev $ifc || return 1
  VS_VIA=tcp; VS_PEER=$(arg emu.vsock.net_peer 10.0.7.1)
  result vsock.net_mac "$(cat /sys/class/net/$ifc/address)"
}

w_vsock() {  # the passes of emu.vsock.do, in order
  local p r rc=0
  VS_VIA=vsock; VS_SERVER=
  [ -x /usr/bin/socat ] || { warn "vsock needs socat (an image with the socat layer)"; return 1; }
  for p in $(arg emu.vsock.do connect | tr , ' '); do
    echo "EMU-VSOCK pass $p"
    if type "vsock_$p" >/dev/null 2>&1; then "vsock_$p"; r=$?
    else warn "no vsock pass $p"; r=127; fi
    result "vsock.$p.rc" $r
    [ $r = 0 ] || rc=$r
  done
  [ -n "$VS_SERVER" ] && kill $VS_SERVER 2>/dev/null
  return $rc
}

"""
