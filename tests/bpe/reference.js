// Reference tokens for tests/bpe/cases.txt from the npm package gpt-3-encoder's own
// encoder (GPT-2's vocabulary and merges, JavaScript port of GPT-2's encoder.py).
//   usage: node tests/bpe/reference.js DIR_WITH_Encoder.js CASES > EXPECTED
// Text that is not valid UTF-8 cannot reach a JavaScript string unchanged, so, as
// infmoe's tokeniser does, the valid runs between invalid bytes are encoded and
// each invalid byte becomes its single-byte token.
'use strict';
const fs = require('fs');
const path = require('path');
const [dir, casesPath] = process.argv.slice(2);
const { encode } = require(path.resolve(dir, 'Encoder.js'));
const encoder = JSON.parse(fs.readFileSync(path.join(dir, 'encoder.json')));

// GPT-2's byte -> character map (bytes_to_unicode)
const byteChar = [];
for (let b = 0, n = 0; b < 256; b++) {
  const printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  byteChar[b] = String.fromCharCode(printable ? b : 256 + n++);
}

function unescape(line) {
  const out = [];
  for (let i = 0; i < line.length;) {
    if (line[i] !== '\\') {
      const cp = line.codePointAt(i);
      out.push(...Buffer.from(String.fromCodePoint(cp), 'utf8'));
      i += cp > 0xffff ? 2 : 1;
      continue;
    }
    const c = line[i + 1];
    if (c === 'n') { out.push(10); i += 2; }
    else if (c === 't') { out.push(9); i += 2; }
    else if (c === 'r') { out.push(13); i += 2; }
    else if (c === '\\') { out.push(92); i += 2; }
    else if (c === 'x') { out.push(parseInt(line.substr(i + 2, 2), 16)); i += 4; }
    else if (c === 'u') {
      const end = line.indexOf('}', i);
      out.push(...Buffer.from(String.fromCodePoint(parseInt(line.slice(i + 3, end), 16)), 'utf8'));
      i = end + 1;
    } else throw new Error('bad escape in ' + line);
  }
  return Buffer.from(out);
}

// length of the valid UTF-8 sequence at s[i], 0 if invalid
function seqLen(s, i) {
  const c = s[i];
  if (c < 0x80) return 1;
  let k, v, min;
  if (c >= 0xc2 && c <= 0xdf) { k = 2; v = c & 0x1f; min = 0x80; }
  else if (c >= 0xe0 && c <= 0xef) { k = 3; v = c & 0x0f; min = 0x800; }
  else if (c >= 0xf0 && c <= 0xf4) { k = 4; v = c & 0x07; min = 0x10000; }
  else return 0;
  if (i + k > s.length) return 0;
  for (let j = 1; j < k; j++) {
    if ((s[i + j] & 0xc0) !== 0x80) return 0;
    v = v * 64 + (s[i + j] & 0x3f);
  }
  if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) return 0;
  return k;
}

const lines = fs.readFileSync(casesPath, 'utf8').split('\n');
if (lines[lines.length - 1] === '') lines.pop();
for (const line of lines) {
  if (line.startsWith('#')) continue;
  const s = unescape(line);
  const tokens = [];
  for (let i = 0; i < s.length;) {
    let j = i;
    for (let k; j < s.length && (k = seqLen(s, j)) > 0;) j += k;
    if (j > i) tokens.push(...encode(s.subarray(i, j).toString('utf8')));
    for (; j < s.length && seqLen(s, j) === 0; j++) tokens.push(encoder[byteChar[s[j]]]);
    i = j;
  }
  console.log(tokens.join(' '));
}
