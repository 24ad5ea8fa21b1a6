#!/usr/bin/env bash
# Every installed program has a man page that says what its --help says:
#   man_pages_test.sh BIN_DIR MAN_DIR PROGRAM...
# For each program: man/PROGRAM.1 exists and formats without a warning,
# `PROGRAM --help` succeeds, and the options are the same in both (every
# --option of the help is in the page, and the page names no option the help
# does not). uipcctl's help is its own and every command's; each command is in
# the page. uipc(7) names every program.
set -uo pipefail
bin=$1 man=$2
shift 2
failed=0
fail() { echo "man pages: $*" >&2; failed=1; }

options_of_help() { grep -oE -- '--[a-z0-9][a-z0-9-]*' | grep -vx -- '--help' | sort -u; }
# The options a page documents: those of its SYNOPSIS, OPTIONS and COMMANDS
# (an example's `systemctl --user` is not one).
options_of_page() {
  awk '/^\.SH/ { keep = ($2 == "SYNOPSIS" || $2 == "OPTIONS" || $2 == "COMMANDS") } keep' "$1" |
    grep -oE -- '\\-\\-[a-z0-9][a-z0-9\\-]*' | sed 's/\\//g' | grep -vx -- '--help' | sort -u
}

for program in "$@"; do
  page="$man/$program.1"
  if [ ! -f "$page" ]; then fail "$program has no page ($page)"; continue; fi
  if command -v groff >/dev/null; then
    warnings=$(LC_ALL=C.UTF-8 groff -man -ww -z "$page" 2>&1)
    [ -z "$warnings" ] || fail "$page: $warnings"
  fi
  # Help goes to standard output (`PROGRAM --help | less`), with status 0.
  if ! help=$("$bin/$program" --help 2>/dev/null); then fail "$program --help failed"; continue; fi
  [ -n "$help" ] || fail "$program --help printed nothing on standard output"
  if [ "$program" = uipcctl ]; then
    commands=$(printf '%s\n' "$help" | sed -n 's/^  \([a-z]*\)  .*/\1/p')
    [ -n "$commands" ] || fail "uipcctl --help lists no command"
    for c in $commands; do
      grep -qE "^\.(SS|B) .*\b$c\b" "$page" || fail "uipcctl.1 does not describe the command $c"
      help+=$'\n'$("$bin/uipcctl" "$c" --help 2>/dev/null) || fail "uipcctl $c --help failed"
    done
  fi
  missing=$(comm -23 <(printf '%s\n' "$help" | options_of_help) <(options_of_page "$page"))
  extra=$(comm -13 <(printf '%s\n' "$help" | options_of_help) <(options_of_page "$page"))
  [ -z "$missing" ] || fail "$page lacks what $program --help has:" $missing
  [ -z "$extra" ] || fail "$page has what $program --help lacks:" $extra
  grep -q "^\.BR $program (1)" "$man/uipc.7" || fail "uipc.7 does not name $program"
done
[ "$failed" -eq 0 ] && echo "man pages: $# programs, each page matches its --help"
exit "$failed"
