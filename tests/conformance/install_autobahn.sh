#!/usr/bin/env bash
# Idempotent installer for the Autobahn|Testsuite (wstest) used by `make conformance`.
#
# Why this exists: autobahntestsuite is Python 2.7 code, so it cannot live in the
# project's python3 venv. We build a dedicated 2.7 virtualenv OUTSIDE the repo
# (cached, so re-runs are instant) from pyenv's 2.7 interpreter, using the last
# virtualenv release that can still create 2.7 environments. Dependency pins that
# keep the install building under 2.7 live next to this script in
# autobahn-constraints.txt.
#
# Output contract: on success the ONLY line on stdout is the absolute path of the
# `wstest` binary; all progress goes to stderr. Any failure exits non-zero loudly.
#
# Environment knobs:
#   WSFAN_AUTOBAHN_VENV   target venv (default ${XDG_CACHE_HOME:-$HOME/.cache}/wsfan/autobahn-venv)
#   WSFAN_PYTHON27        python2.7 interpreter to use (default: pyenv's 2.7.x, then python2.7 on PATH)
#   WSFAN_AUTOBAHN_FORCE  set to 1 to rebuild even if the cached venv looks fine
set -euo pipefail

AUTOBAHN_VERSION="25.10.1"
VIRTUALENV_VERSION="20.21.1"   # last virtualenv that creates Python 2.7 environments

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="$HERE/autobahn-constraints.txt"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/wsfan"
VENV="${WSFAN_AUTOBAHN_VENV:-$CACHE_ROOT/autobahn-venv}"
TOOL_VENV="$CACHE_ROOT/virtualenv-$VIRTUALENV_VERSION"
STAMP="$VENV/.wsfan-autobahn-stamp"

log() { printf '[install_autobahn] %s\n' "$*" >&2; }
die() { printf '[install_autobahn] ERROR: %s\n' "$*" >&2; exit 1; }

[[ -f "$CONSTRAINTS" ]] || die "constraints file missing: $CONSTRAINTS"

# Serialize concurrent runs (e.g. `make conformance` and pytest at once) on one cache.
mkdir -p "$CACHE_ROOT" "$(dirname "$VENV")"
exec 9>"$(dirname "$VENV")/.autobahn-install.lock"
flock 9 || die "cannot lock $(dirname "$VENV")/.autobahn-install.lock"

# The stamp ties the cached venv to the exact version + constraints it was built with,
# so editing the pins triggers a rebuild instead of silently reusing a stale venv.
want_stamp="autobahntestsuite==$AUTOBAHN_VERSION $(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"

venv_ok() {
    [[ -x "$VENV/bin/wstest" && -f "$STAMP" ]] || return 1
    [[ "$(cat "$STAMP")" == "$want_stamp" ]] || return 1
    # Importing the fuzzing module pulls in twisted/autobahn: catches a half-broken venv.
    "$VENV/bin/python" -c 'import autobahntestsuite.fuzzing, autobahntestsuite.wstest' >/dev/null 2>&1 || return 1
}

if [[ "${WSFAN_AUTOBAHN_FORCE:-0}" != "1" ]] && venv_ok; then
    log "cached venv OK: $VENV"
    echo "$VENV/bin/wstest"
    exit 0
fi

# --- locate a Python 2.7 interpreter -------------------------------------------------
find_py27() {
    if [[ -n "${WSFAN_PYTHON27:-}" ]]; then echo "$WSFAN_PYTHON27"; return 0; fi
    local root cand
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
        for cand in $(ls -d "$root"/versions/2.7.* 2>/dev/null | sort -V -r); do
            if [[ -x "$cand/bin/python" ]]; then echo "$cand/bin/python"; return 0; fi
        done
    fi
    for cand in "$HOME"/.pyenv/versions/2.7.*/bin/python; do
        if [[ -x "$cand" ]]; then echo "$cand"; return 0; fi
    done
    if command -v python2.7 >/dev/null 2>&1; then command -v python2.7; return 0; fi
    return 1
}
PY27="$(find_py27)" || die "no Python 2.7 interpreter found. The Autobahn|Testsuite needs one: install pyenv (https://github.com/pyenv/pyenv#installation) and run 'pyenv install 2.7.18', or install a python2.7 package where your OS still has one, or set WSFAN_PYTHON27=/path/to/python2.7"
"$PY27" -c 'import sys; assert sys.version_info[:2] == (2, 7), sys.version' \
    || die "$PY27 is not Python 2.7"
log "using Python 2.7: $PY27"

# --- a throwaway python3 venv holding virtualenv==20.21.1 ----------------------------
PY3="${WSFAN_PYTHON3:-$(command -v python3)}" || die "python3 not found"
if ! "$TOOL_VENV/bin/python" -c "import virtualenv, sys; sys.exit(virtualenv.__version__ != '$VIRTUALENV_VERSION')" >/dev/null 2>&1; then
    log "creating virtualenv tool venv: $TOOL_VENV"
    rm -rf "$TOOL_VENV"
    mkdir -p "$CACHE_ROOT"
    "$PY3" -m venv "$TOOL_VENV" || die "python3 -m venv failed"
    "$TOOL_VENV/bin/python" -m pip install --quiet "virtualenv==$VIRTUALENV_VERSION" >&2 \
        || die "pip install virtualenv==$VIRTUALENV_VERSION failed"
fi

# --- (re)build the 2.7 venv at its final path ---------------------------------------
# virtualenv bakes absolute paths into bin/ scripts, so it is built in place. A previous
# venv is moved aside first and restored if this build fails, so a failed re-install
# never destroys a working cache; a failed fresh install leaves nothing behind (the
# stamp is written last, so a half-built venv is never mistaken for a good one).
mkdir -p "$(dirname "$VENV")"
OLD="$VENV.old.$$"
if [[ -e "$VENV" ]]; then mv "$VENV" "$OLD"; fi
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        rm -rf "$VENV"
        if [[ -e "$OLD" ]]; then mv "$OLD" "$VENV"; fi
    else
        rm -rf "$OLD"
    fi
}
trap cleanup EXIT
log "creating Python 2.7 venv: $VENV"
"$TOOL_VENV/bin/python" -m virtualenv --quiet -p "$PY27" "$VENV" >&2 \
    || die "virtualenv -p $PY27 $VENV failed"

log "pip install autobahntestsuite==$AUTOBAHN_VERSION (about a minute)"
# -c: our 2.7-compatible pins. The machine-wide pip constraint (if any) still applies.
"$VENV/bin/python" -m pip install --no-input --progress-bar off \
    -c "$CONSTRAINTS" "autobahntestsuite==$AUTOBAHN_VERSION" >&2 \
    || die "pip install autobahntestsuite==$AUTOBAHN_VERSION failed (see output above)"

"$VENV/bin/python" -c 'import autobahntestsuite.fuzzing, autobahntestsuite.wstest' >&2 \
    || die "autobahntestsuite installed but does not import"
[[ -x "$VENV/bin/wstest" ]] || die "wstest binary missing after install"
"$VENV/bin/wstest" --help >/dev/null 2>&1 || die "'wstest --help' fails"

echo "$want_stamp" >"$STAMP"
log "installed: $VENV/bin/wstest"
echo "$VENV/bin/wstest"
