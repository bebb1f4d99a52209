"""/init's `balloon` workload (busybox ash): guest memory the host takes back and returns.

Appended to init_script.INIT before its main loop (helpers `arg`, `result`, `warn`, `sha`).
The guest's virtio_balloon driver does the inflating and deflating by itself when the
host changes the target; the workload makes guest RAM backed on the host (fills tmpfs),
frees it, and waits for the balloon, printing `EMU-BALLOON <what> ...` lines that the host
follows. The balloon's size is read from /proc/vmstat (balloon_inflate - balloon_deflate
pages). Knobs (`emu.balloon.<knob>=`):

- `do` (fill,free): passes, comma-separated, run in order:
  `fill` writes `fill_mib` (128; `avail`: MemAvailable less `keep_mib`, 16) MiB of
  random data to a file on a tmpfs that may take all RAM (every page of it allocated in
  the guest, so on the host too), prints its sha256 and
  `EMU-BALLOON filled <MiB>`; `free` deletes it (`EMU-BALLOON freed`), the guest's free
  page reporting may hand the pages to the host; `inflated` waits until the balloon
  holds at least `mib` (64) MiB (`EMU-BALLOON inflated <pages>`; `free` and `inflated`
  print MemFree, in KiB, before their marker); `deflated` waits until
  it is empty again (`EMU-BALLOON deflated`); `check` writes `check_mib` (64) MiB to
  tmpfs and reads it back (pages the host released come back on touch); `mem` prints
  MemTotal / MemFree / MemAvailable in KiB;
- `wait_s` (60): how long `inflated` and `deflated` wait.
"""

BALLOON_WORKLOAD = r"""
bl_pages() {  # pages in the balloon now
  awk '/^balloon_inflate / {i = $2} /^balloon_deflate / {d = $2} END {print i - d}' /proc/vmstat
}

bl_wait() {  # bl_wait WHAT TEST: until `TEST PAGES` holds, up to wait_s
  local what=$1 test=$2 limit deadline
  limit=$(arg emu.balloon.wait_s 60)
  deadline=$(($(cut -d. -f1 /proc/uptime) + limit))
  until $test "$(bl_pages)"; do
    [ "$(cut -d. -f1 /proc/uptime)" -ge $deadline ] &&
      { warn "balloon not $what after $limit s: $(bl_pages) pages"; return 1; }
    sleep 0.1
  done
}

bl_full() { [ "$1" -ge $(($(arg emu.balloon.mib 64) * 256)) ]; }
bl_empty() { [ "$1" = 0 ]; }

balloon_fill() {  # every page of fill_mib MiB allocated: backed on the host
  local mib avail
  mib=$(arg emu.balloon.fill_mib 128)
  avail=$(($(awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo) / 1024))
  [ "$mib" = avail ] && mib=$((avail - $(arg emu.balloon.keep_mib 16)))
  mkdir -p /tmp/bl
  grep -q ' /tmp/bl ' /proc/mounts || mount -t tmpfs -o size=100% bl /tmp/bl || return 1
  dd if=/dev/urandom of=/tmp/bl/fill bs=1M count="$mib" 2>/dev/null || return 1
  result balloon.fill_mib "$mib"
  result balloon.fill_sha256 "$(sha < /tmp/bl/fill)"
  echo "EMU-BALLOON filled $mib"
}

bl_memfree() { awk '$1 == "MemFree:" {print $2}' /proc/meminfo; }

balloon_free() {
  rm -f /tmp/bl/fill
  result balloon.freed_memfree "$(bl_memfree)"
  echo "EMU-BALLOON freed"
}

balloon_inflated() {  # the figures first: the host acts on the marker
  bl_wait inflated bl_full || return 1
  result balloon.inflated_pages "$(bl_pages)"
  result balloon.inflated_memfree "$(bl_memfree)"
  echo "EMU-BALLOON inflated $(bl_pages)"
}

balloon_deflated() {
  bl_wait deflated bl_empty || return 1
  echo "EMU-BALLOON deflated"
}

balloon_check() {  # memory written and read back after the host has had it
  local mib w r
  mib=$(arg emu.balloon.check_mib 64)
  dd if=/dev/urandom of=/tmp/bl.check bs=1M count="$mib" 2>/dev/null || return 1
  w=$(sha < /tmp/bl.check)
  echo 1 > /proc/sys/vm/drop_caches
  r=$(sha < /tmp/bl.check)
  rm -f /tmp/bl.check
  result balloon.check_sha256 "$w"
  [ "$w" = "$r" ] || { warn "tmpfs data changed under the balloon"; return 1; }
}

balloon_mem() {
  local k
  for k in MemTotal MemFree MemAvailable; do
    result "balloon.$k" "$(awk -v k="$k:" '$1 == k {print $2}' /proc/meminfo)"
  done
}

w_balloon() {  # the passes of emu.balloon.do, in order
  local p r rc=0
  wait_for /sys/bus/virtio/drivers/virtio_balloon || return 1
  for p in $(arg emu.balloon.do fill,free | tr , ' '); do
    if type "balloon_$p" >/dev/null 2>&1; then "balloon_$p"; r=$?
    else warn "no balloon pass $p"; r=127; fi
    result "balloon.$p.rc" $r
    [ $r = 0 ] || { rc=$r; break; }
  done
  return $rc
}

"""
