#!/usr/bin/env bash
# Checks that the sources the project owns follow .clang-format: every git-tracked *.cpp, *.hpp,
# *.cu and *.cuh under src/, include/, kernels/ and tests/, checked with Debian 12's clang-format
# 14 (scripts/setup.sh installs it; CLANG_FORMAT overrides the binary). Changes nothing.
# Exits 0 when all are formatted; 1 listing the files that are not, with the command that formats
# them; 2 when clang-format is missing or fails.
# Usage: scripts/check_format.sh
set -euo pipefail
cd "$(dirname "$0")/.."

clang_format=${CLANG_FORMAT:-/usr/bin/clang-format}
if ! command -v "$clang_format" >/dev/null 2>&1; then
  echo "check_format: $clang_format not found: install Debian's clang-format" \
       "(scripts/setup.sh --packages-only does this)" >&2
  exit 2
fi
if ! version=$("$clang_format" --version 2>&1); then
  echo "check_format: $clang_format --version failed: $version" >&2
  exit 2
fi
if [[ ! $version =~ version\ 14\. ]]; then
  echo "check_format: warning: expected clang-format 14 (Debian 12), got: $version;" \
       "other versions format some constructs differently" >&2
fi

files=()
while IFS= read -r -d '' f; do
  [[ -f $f ]] && files+=("$f")  # skip tracked files deleted in the work tree
done < <(git ls-files -z -- src include kernels tests | grep -zE '\.(cpp|hpp|cu|cuh)$')

unformatted=()
for f in "${files[@]}"; do
  if ! out=$("$clang_format" --dry-run -Werror "$f" 2>&1); then
    if [[ $out == *"-Wclang-format-violations"* ]]; then
      unformatted+=("$f")
    else
      echo "check_format: $clang_format failed on $f:" >&2
      echo "$out" >&2
      exit 2
    fi
  fi
done

if ((${#unformatted[@]})); then
  echo "check_format: ${#unformatted[@]} of ${#files[@]} files are not clang-formatted:" >&2
  printf '  %s\n' "${unformatted[@]}" >&2
  echo "Format them with:" >&2
  printf '  %s -i' "$clang_format" >&2
  printf ' %q' "${unformatted[@]}" >&2
  echo >&2
  exit 1
fi
echo "check_format: all ${#files[@]} files are clang-formatted"
