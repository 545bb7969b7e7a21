# Shared by the launch scripts (sourced, not run): shell quoting for the commands they print and run.

q() {  # shell-quote one word exactly like Python's shlex.quote
  local LC_ALL=C s=$1 sq="'\"'\"'"
  if [[ -z $s ]]; then printf "''"
  elif [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$s"
  else printf "'%s'" "${s//\'/$sq}"; fi
}
qjoin() { local out="" a; for a in "$@"; do out+="${out:+ }$(q "$a")"; done; printf '%s' "$out"; }
