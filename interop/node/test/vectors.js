'use strict';
// Reads the `<!-- vectors: NAME -->` JSON blocks of FORMAT.md.
const fs = require('fs');
const path = require('path');

const FORMAT_MD = path.join(__dirname, '..', '..', '..', 'FORMAT.md');

function loadVectors() {
  const text = fs.readFileSync(FORMAT_MD, 'utf8');
  const re = /<!-- vectors: ([\w-]+) -->\s*\n```json\n([\s\S]*?)\n```/g;
  const out = {};
  let m;
  while ((m = re.exec(text)) !== null) out[m[1]] = JSON.parse(m[2]);
  return out;
}

/** The raw JSON text of a block (for exact number parsing). */
function vectorText(name) {
  const text = fs.readFileSync(FORMAT_MD, 'utf8');
  const m = new RegExp(`<!-- vectors: ${name} -->\\s*\\n\`\`\`json\\n([\\s\\S]*?)\\n\`\`\``).exec(text);
  return m[1];
}

const hex = (s) => Buffer.from(s, 'hex');

module.exports = { loadVectors, vectorText, hex, FORMAT_MD };
