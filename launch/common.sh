# shellcheck shell=bash
# Helpers sourced by the launch scripts: one-line errors and readable shell quoting.

# Prints "PROG: error: MESSAGE" on stderr and exits 2 (PROG must be set by the caller).
die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Quotes one word for a POSIX shell, readably: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: a line a shell reads back as "$@".
quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Dies unless every argument looks like a config override (key=value).
check_overrides() {
  local override
  for override in "$@"; do
    [[ $override =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "override '$override' is not key=value"
  done
}
