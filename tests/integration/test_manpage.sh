#!/usr/bin/env bash
# The man page is generated from --help at build time (help2man): every
# option --help lists must be in it, and it must render.
source "$(dirname "$0")/lib.sh"
page=$TEST_TOOLS/bscache.1
[[ -s $page ]] || fail "$page missing (the build makes it with help2man)"

mapfile -t options < <("$BSCACHE" --help | grep -oE '^ +(-[a-zA-Z] \[ )?--[a-z][a-z-]*' | grep -oE -- '--[a-z-]+')
((${#options[@]} >= 30)) || fail "only ${#options[@]} options found in --help"
missing=()
for option in "${options[@]}"; do
  # roff writes each '-' of an option as '\-'.
  grep -qF -- "${option//-/\\-}" "$page" || missing+=("$option")
done
((${#missing[@]} == 0)) || fail "options in --help but not in the man page: ${missing[*]}"
pass "all ${#options[@]} options of --help are in the man page"

groff -man -Tascii -P -cbou -ww "$page" >"$T/rendered" 2>"$T/groff.err" || fail "groff cannot render the man page"
[[ ! -s $T/groff.err ]] || { cat "$T/groff.err"; fail "groff warns about the man page"; }
grep -q 'EXIT STATUS' "$T/rendered" && grep -q 'reconnect-max' "$T/rendered" || fail "rendered page lacks sections"
pass "the man page renders"
