"""/init's `fs` workload (busybox ash): mount a virtio-fs share, check it, time it.

Appended to init_script.INIT before its main loop, so it can use the helpers there
(`arg`, `result`, `warn`, `sha`, `now_ns`, `timed_dd`). Knobs (`emu.fs.<knob>=`):

- `tag` (emu), `mnt` (/mnt): what to mount where (`mount -t virtiofs TAG MNT`);
- `do` (check): passes, comma-separated, run in order on the mounted share:
  `check` correctness, `ro` (a read-only share refuses writes), `seq` 1 MiB sequential
  write then read, `rand` 4 KiB random reads (fio, psync, O_DIRECT: the image needs the
  fio layer), `meta` create + stat + unlink of many files, `tree` tar x + find + rm -r;
- `check`: `dir` (emu-check) the directory it (re)creates in the share, `host` (host.bin)
  a file the host put in the share (read and checksummed; its bytes are the data the
  pass writes, so that two backends given the same file print the same checksums;
  without it the data comes from /dev/urandom), `sizes` of the files written;
- benches: `mib` (256) for seq and rand, `rand_s` (5) seconds of random reads, `files`
  (10000) for meta, `tree_dirs` (50) x `tree_files` (20) for tree.

The check pass does every operation both in the share and in a tmpfs mirror, unmounts
and mounts the share again (the guest forgets everything: DESTROY, then a new INIT), and
compares the two trees entry by entry; the share's listing is printed as
`EMU-RESULT fs.ls.<path> <type>:<mode>:<uid>:<gid>:<size>:<nlink>:<sha256|target|->`
(size and nlink `-` for directories, which differ between file systems), so the host can
compare it with its own view of the directory and with another backend's run.
"""

FS_WORKLOAD = r"""
fs_list() {  # fs_list DIR: "path type:mode:uid:gid:size:nlink:content" per entry, sorted
  (cd "$1" && find . ! -name . | sort > /tmp/ls.names &&
    xargs -r stat -c '%n %f %a %u %g %s %h' < /tmp/ls.names > /tmp/ls.stat &&
    find . -type f | sort | xargs -r sha256sum > /tmp/ls.sha &&
    find . -type l | while read -r l; do echo "$l $(readlink "$l")"; done > /tmp/ls.lnk) ||
    return 1
  awk 'FILENAME == "/tmp/ls.sha" { c[$2] = $1; next }
    FILENAME == "/tmp/ls.lnk" { c[$1] = $2; next }
    { t = substr($2, 1, 1)
      t = t == "8" ? "f" : t == "4" ? "d" : t == "a" ? "l" : t == "1" ? "p" : "?" t
      size = $6; nlink = $7
      if (t == "d") { size = "-"; nlink = "-" }
      content = ($1 in c) ? c[$1] : "-"
      print substr($1, 3), t ":" $3 ":" $4 ":" $5 ":" size ":" nlink ":" content }' \
    /tmp/ls.sha /tmp/ls.lnk /tmp/ls.stat
}

fs_mount() {  # the device may still be binding when /init gets here: retry for 5 s
  local i=0
  grep -qw virtiofs /proc/filesystems ||
    { modprobe virtiofs 2>/dev/null || warn "no virtiofs in /proc/filesystems"; }
  mkdir -p "$FS_MNT"
  until mount -t virtiofs "$FS_TAG" "$FS_MNT" 2>/tmp/mount.err; do
    i=$((i + 1))
    [ $i -ge 50 ] && { warn "mount -t virtiofs $FS_TAG: $(cat /tmp/mount.err)"; return 1; }
    sleep 0.1
  done
}

fs_drop() { sync; echo "${1:-3}" > /proc/sys/vm/drop_caches; }

fs_check() {  # correctness: every operation in the share and in a tmpfs mirror, compared
  local d="$FS_MNT/$(arg emu.fs.dir emu-check)" m=/tmp/mirror host bad=0 n=0 s
  host=$(arg emu.fs.host host.bin)
  both() {  # both CMD: run CMD in the share's directory, then in the mirror
    (cd "$d" && eval "$*") || { warn "in the share: $* failed"; bad=$((bad + 1)); }
    (cd "$m" && eval "$*") || { warn "in tmpfs: $* failed"; bad=$((bad + 1)); }
  }
  if [ -f "$FS_MNT/$host" ]; then
    result fs.host_size "$(stat -c %s "$FS_MNT/$host")"
    result fs.host_sha256 "$(sha < "$FS_MNT/$host")"
    cp "$FS_MNT/$host" /tmp/src || return 1
  else
    dd if=/dev/urandom of=/tmp/src bs=1M count=4 2>/dev/null
  fi
  rm -rf "$d" "$m" && mkdir "$d" "$m" || return 1
  for s in $(arg emu.fs.sizes 0,1,4095,4096,4097,65536,131073,1048576,3000000 | tr , ' '); do
    # file n: s bytes of the source from offset n * 4099, so no two files share a page
    tail -c +$((n * 4099 + 1)) /tmp/src | head -c "$s" > /tmp/data
    [ "$(wc -c < /tmp/data)" = "$s" ] || { warn "source too small for $s bytes"; bad=$((bad + 1)); }
    both "dd if=/tmp/data of=f$s bs=1M 2>/dev/null"
    n=$((n + 1))
  done
  rm -f /tmp/data
  both 'mkdir -p sub/deep/er && echo deep > sub/deep/er/leaf && echo moved > a.txt'
  both 'mv a.txt sub/b.txt && echo old > r1 && echo new > r2 && mv r2 r1'
  both 'mkdir dirA && echo x > dirA/x && mv dirA dirB'
  both 'ln -s sub/b.txt sym && ln -s /nonexistent/target dangling && ln f4096 hard'
  # no set-id bits: emu refuses to make set-id files (docs/fs.md)
  both 'chmod 640 f4096 && chmod 700 sub && chmod 751 f1 && chown 1000:1000 f1'
  both 'truncate -s 10000 f65536 && truncate -s 200000 f0 && fallocate -l 300000 f4095'
  both 'dd if=/tmp/src of=f131073 bs=1000 seek=7 count=3 conv=notrunc 2>/dev/null'
  both 'echo appended >> f4097 && touch -t 202001020304.05 f1048576 && mkfifo fifo'
  both 'mkdir gone && rmdir gone && rm sub/deep/er/leaf && rmdir sub/deep/er'
  both 'cp f4096 unlinked && mkdir many && i=0 &&
    while [ $i -lt 300 ]; do : > many/m$i; i=$((i + 1)); done'
  # an open file stays readable after its unlink (the backend keeps its host fd)
  exec 3< "$d/unlinked"
  both 'rm unlinked'
  [ "$(sha <&3)" = "$(sha < "$d/f4096")" ] && result fs.unlinked_open_read ok ||
    { result fs.unlinked_open_read bad; bad=$((bad + 1)); }
  exec 3<&-
  result fs.hardlink_same_ino "$([ "$(stat -c %i "$d/f4096")" = "$(stat -c %i "$d/hard")" ] &&
    echo 1 || echo 0)"
  result fs.many_count "$(ls "$d/many" | wc -l)"
  result fs.statfs_ok "$(stat -f -c %b "$FS_MNT" | awk '{print ($1 > 0)}')"
  # forget everything: a new mount reads the tree from the backend alone
  cd / && umount "$FS_MNT" || { warn "umount failed"; return 1; }
  fs_mount || return 1
  result fs.remount ok
  fs_list "$d" > /tmp/ls.share || bad=$((bad + 1))
  fs_list "$m" > /tmp/ls.mirror || bad=$((bad + 1))
  result fs.mtime_touched "$(stat -c %Y "$d/f1048576")"
  result fs.entries "$(wc -l < /tmp/ls.share)"
  if ! cmp -s /tmp/ls.share /tmp/ls.mirror; then
    bad=$((bad + 1))
    diff /tmp/ls.mirror /tmp/ls.share | sed -n 's/^[-+][^-+]/&/p' | head -20 |
      while read -r line; do warn "tmpfs/share differ: $line"; done
  fi
  grep -v '^many/' /tmp/ls.share | while read -r p v; do result "fs.ls.$p" "$v"; done
  rm -rf "$m" /tmp/src /tmp/ls.*
  result fs.check_bad $bad
  [ $bad = 0 ]
}

fs_ro() {  # a read-only share: reads work, every write kind is refused with EROFS
  local out refused=0 f
  f=$(find "$FS_MNT" -type f | head -n 1)
  [ -n "$f" ] && { cat "$f" > /dev/null || { warn "read of $f failed"; return 1; }; }
  for op in ": > '$FS_MNT/ro-new'" "mkdir '$FS_MNT/ro-dir'" "touch '$FS_MNT'" \
    "chmod 700 '$FS_MNT'" "ln -s x '$FS_MNT/ro-sym'"; do
    out=$(eval "$op" 2>&1) && { warn "not refused: $op"; continue; }
    case "$out" in *Read-only*) refused=$((refused + 1));; *) warn "$op: $out";; esac
  done
  result fs.ro_refused $refused
  [ $refused = 5 ]
}

fs_bench_dir() { mkdir -p "$FS_MNT/emu-bench" && echo "$FS_MNT/emu-bench"; }

fs_seq() {  # 1 MiB sequential write (fsync'd), then read with the guest's cache dropped
  local b f mib
  b=$(fs_bench_dir) || return 1
  f=$b/big; mib=$(arg emu.fs.mib 256)
  timed_dd fs_seq_write $((mib << 20)) mibps if=/dev/zero of="$f" bs=1M count="$mib" \
    conv=fsync || return 1
  fs_drop
  timed_dd fs_seq_read $((mib << 20)) mibps if="$f" of=/dev/null bs=1M
}

fs_rand() {  # 4 KiB random reads, QD1 (fio psync, O_DIRECT: every read reaches the device)
  local b f mib out
  [ -x /usr/bin/fio ] || { warn "fs rand needs fio (an image with the fio layer)"; return 1; }
  b=$(fs_bench_dir) || return 1
  f=$b/big; mib=$(arg emu.fs.mib 256)
  if [ "$(stat -c %s "$f" 2>/dev/null)" != $((mib << 20)) ]; then
    dd if=/dev/zero of="$f" bs=1M count="$mib" conv=fsync 2>/dev/null || return 1
  fi
  out=$(LD_LIBRARY_PATH=/usr/lib/emu-fio fio --name=rand --filename="$f" --rw=randread \
    --bs=4k --ioengine=psync --direct=1 --size=$((mib << 20)) --time_based \
    --runtime="$(arg emu.fs.rand_s 5)" --output-format=terse --terse-version=3 2>/tmp/fio.err)
  [ -s /tmp/fio.err ] && while read -r line; do warn "fio: $line"; done < /tmp/fio.err
  # terse v3: field 5 is the error, field 8 the read IOPS
  [ "$(echo "$out" | cut -d';' -f5)" = 0 ] || return 1
  echo "EMU-BENCH fs_rand_read_4k $(echo "$out" | cut -d';' -f8) IOPS"
}

fs_rate() {  # fs_rate NAME COUNT T0 T1: COUNT operations between two now_ns stamps
  awk -v n="$1" -v c="$2" -v t=$(($4 - $3)) 'BEGIN {
    printf "EMU-BENCH %s %.0f ops/s\n", n, c / (t / 1e9) }'
}

fs_meta() {  # create, stat (after dropping dentries: real LOOKUPs) and unlink N files
  local b d n i t0 t1 t2 t3 t4
  b=$(fs_bench_dir) || return 1
  d=$b/meta; n=$(arg emu.fs.files 10000)
  rm -rf "$d"; mkdir "$d" || return 1
  t0=$(now_ns); i=0
  while [ $i -lt "$n" ]; do : > "$d/f$i" || return 1; i=$((i + 1)); done
  t1=$(now_ns); fs_drop 2; t2=$(now_ns); i=0
  while [ $i -lt "$n" ]; do [ -f "$d/f$i" ] || { warn "f$i missing"; return 1; }; i=$((i + 1)); done
  t3=$(now_ns)
  rm -r "$d" || return 1
  t4=$(now_ns)
  fs_rate fs_meta_create "$n" "$t0" "$t1"
  fs_rate fs_meta_stat "$n" "$t2" "$t3"
  fs_rate fs_meta_unlink "$n" "$t3" "$t4"
  fs_rate fs_meta_ops $((3 * n)) 0 $((t1 - t0 + t4 - t2))
}

fs_tree() {  # tar x of a tree made in tmpfs, find over it (cold), rm -r
  local b dirs files i j t0 t1 t2 t3 t4 entries
  b=$(fs_bench_dir) || return 1
  dirs=$(arg emu.fs.tree_dirs 50); files=$(arg emu.fs.tree_files 20)
  rm -rf /tmp/tree "$b/tree"; i=0
  while [ $i -lt "$dirs" ]; do
    mkdir -p "/tmp/tree/d$i"; j=0
    while [ $j -lt "$files" ]; do echo "file $i $j" > "/tmp/tree/d$i/f$j"; j=$((j + 1)); done
    i=$((i + 1))
  done
  tar cf /tmp/tree.tar -C /tmp tree && rm -rf /tmp/tree || return 1
  entries=$((dirs * files + dirs + 1))
  t0=$(now_ns)
  tar xf /tmp/tree.tar -C "$b" || return 1
  t1=$(now_ns); fs_drop 2; t2=$(now_ns)
  [ "$(find "$b/tree" | wc -l)" = $entries ] || { warn "find saw a different tree"; return 1; }
  t3=$(now_ns)
  rm -r "$b/tree" || return 1
  t4=$(now_ns)
  rm -f /tmp/tree.tar
  fs_rate fs_tar_x "$entries" "$t0" "$t1"
  fs_rate fs_find "$entries" "$t2" "$t3"
  fs_rate fs_rm_r "$entries" "$t3" "$t4"
}

w_fs() {  # mount the virtio-fs share, run the passes in emu.fs.do, unmount
  local p r rc=0
  FS_TAG=$(arg emu.fs.tag emu); FS_MNT=$(arg emu.fs.mnt /mnt)
  fs_mount || return 1
  result fs.mounted "$FS_TAG"
  for p in $(arg emu.fs.do check | tr , ' '); do
    if type "fs_$p" >/dev/null 2>&1; then "fs_$p"; r=$?; else warn "no fs pass $p"; r=127; fi
    result "fs.$p.rc" $r
    [ $r = 0 ] || rc=$r
  done
  rm -rf "$FS_MNT/emu-bench"
  cd / && umount "$FS_MNT" || { warn "umount $FS_MNT failed"; rc=1; }
  return $rc
}

"""
