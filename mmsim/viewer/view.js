// mmsim view: the frame grid, its panels and the time scrubber. Plain JavaScript, no libraries;
// the data (header, owners, snapshots) is the JSON in #mmview-data (see mmsim/view.py).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmt = (v) => (v === null || v === undefined ? "-" : typeof v === "number" ? v.toLocaleString("en-US") : String(v));

  let D;
  try {
    D = JSON.parse($("mmview-data").textContent);
  } catch (e) {
    document.body.insertAdjacentHTML("afterbegin", '<div id="error">This page holds no readable data: ' + esc(e) + "</div>");
    return;
  }
  const H = D.header, OWN = D.owners, SN = D.snaps;
  const N = H.frames, PB = H.pageblock_order, B = 1 << PB, OB = H.owner_base;
  const NOT_RAM = 0, K_FREE = 1, K_USED = 2, K_SHARED = 3, U_FREE = 4, U_UNKNOWN = 5;

  // ---- layout: frames in tiles of one pageblock (TW x TH frames, row-major), T tiles a row ----
  const TWB = Math.ceil(PB / 2), THB = PB - TWB, TW = 1 << TWB, TH = 1 << THB;
  const NB = Math.ceil(N / B);
  // tiles a row: a power of two (so a 1 GiB page of 512 blocks is a rectangle), the one that shows
  // all of RAM largest in the window the page opens in
  function fitScale(ww, wh, W, Hh) { // the largest scale (integer px/frame, or 1/k) at which ww x wh units fit
    const g = (s) => (s >= 4 ? 2 : s >= 2 ? 1 : 0);
    for (let s = 64; s >= 1; s--) if ((ww / TW) * (TW * s + g(s)) <= W && (wh / TH) * (TH * s + g(s)) <= Hh) return s;
    return 1 / Math.max(Math.ceil(ww / W), Math.ceil(wh / Hh));
  }
  function chooseT() {
    const box = $("canvasbox"), W = Math.max(50, box.clientWidth) - 8, Hh = Math.max(50, box.clientHeight) - 8;
    let best = 1, bestArea = -1;
    for (let t = 1; t <= 2 * NB; t *= 2) {
      const ww = t * TW, wh = Math.ceil(NB / t) * TH, s = fitScale(ww, wh, W, Hh), area = ww * s * wh * s;
      if (area > bestArea * 1.0001) { best = t; bestArea = area; }
      if (t >= NB) break;
    }
    return best;
  }
  const T = chooseT();
  const TROWS = Math.ceil(NB / T), WORLD_W = T * TW, WORLD_H = TROWS * TH;

  // ---- colours ----
  function abgr(hex) {
    const v = parseInt(hex.slice(1), 16);
    return ((0xff << 24) | ((v & 0xff) << 16) | (v & 0xff00) | ((v >> 16) & 0xff)) >>> 0;
  }
  function lum(hex) {
    const v = parseInt(hex.slice(1), 16);
    const c = [(v >> 16) & 255, (v >> 8) & 255, v & 255].map((x) => { x /= 255; return x <= 0.04045 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  }
  const textOn = (hex) => ((lum(hex) + 0.05) / 0.05 >= 1.05 / (lum(hex) + 0.05) ? "#000000" : "#FFFFFF");
  function mix(c, towards, f) { // ABGR c moved a fraction f towards ABGR towards
    let out = 0xff000000;
    for (const sh of [0, 8, 16]) {
      const a = (c >>> sh) & 255, b = (towards >>> sh) & 255;
      out |= Math.round(a + (b - a) * f) << sh;
    }
    return out >>> 0;
  }
  const NCODES = OB + OWN.length;
  const hexOf = new Array(NCODES).fill("#000000");
  for (const k in H.code_colours) hexOf[+k] = H.code_colours[k];
  OWN.forEach((o, i) => { hexOf[OB + i] = o.colour; });
  const glyphOf = new Array(NCODES).fill("");
  for (const k in H.code_glyphs) glyphOf[+k] = H.code_glyphs[k];
  OWN.forEach((o, i) => { glyphOf[OB + i] = o.tag; });
  const BLACK = abgr("#000000"), WHITE = abgr("#FFFFFF"), BG = abgr("#E2E2E2"), GAP = abgr("#9A9A9A");
  const base = new Uint32Array(NCODES), dim = new Uint32Array(NCODES), ink = new Uint32Array(NCODES);
  for (let c = 0; c < NCODES; c++) {
    base[c] = abgr(hexOf[c]);
    dim[c] = mix(base[c], WHITE, 0.8);
    ink[c] = abgr(textOn(hexOf[c]));
  }
  const stripe = new Uint32Array(NCODES);
  for (let c = 0; c < NCODES; c++) stripe[c] = mix(base[c], ink[c], 0.55);
  // reference counts (user frames): lighter = fewer; cividis-like, readable with any colour vision
  const REFS_HEX = ["#FFFFFF", "#FFE945", "#B9AC70", "#7C7B78", "#414D6B", "#00204D"];
  const REFS = REFS_HEX.map(abgr);
  const refsColour = (r) => REFS[Math.min(r, REFS.length - 1)];
  const REFS_OTHER = { [NOT_RAM]: abgr("#555555"), [K_FREE]: abgr("#DDDDDD"), [K_USED]: abgr("#BBBBBB"), [K_SHARED]: abgr("#999999") };
  // most notable first when a pixel covers many frames
  const rank = new Uint8Array(NCODES);
  rank[NOT_RAM] = 1; rank[U_FREE] = 2; rank[K_FREE] = 3; rank[K_SHARED] = 4; rank[K_USED] = 5; rank[U_UNKNOWN] = 6;
  for (let c = OB; c < NCODES; c++) rank[c] = 7;
  // marks drawn at middle zoom, so the kernel classes read without colour: 1 cross, 2 dot, 3 bar
  const MARK = new Uint8Array(NCODES);
  MARK[NOT_RAM] = 1; MARK[K_FREE] = 2; MARK[K_SHARED] = 3;

  // ---- state: the current snapshot's arrays, rebuilt by XOR records ----
  const who = new Uint16Array(N), refs = new Uint8Array(N);
  const whoBytes = new Uint8Array(who.buffer);
  let cur = -1, target = 0, chain = Promise.resolve();
  const cache = new Map();
  let cacheBytes = 0;

  async function inflate(b64) {
    const bin = atob(b64);
    const u8 = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    const stream = new Blob([u8]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }
  async function record(i) {
    if (cache.has(i)) return cache.get(i);
    const got = await Promise.all([inflate(SN[i].who), inflate(SN[i].refs)]);
    const size = got[0].length + got[1].length;
    if (size < (1 << 22) && cacheBytes + size < (1 << 27)) { cache.set(i, got); cacheBytes += size; }
    return got;
  }
  function applyXor(buf, bytes, esz) {
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    const m = dv.getUint32(0, true);
    let off = 4 + 8 * m, end = 0;
    for (let r = 0; r < m; r++) {
      const s = end + dv.getUint32(4 + 8 * r, true) * esz, len = dv.getUint32(8 + 8 * r, true) * esz;
      for (let j = 0; j < len; j++) bytes[s + j] ^= buf[off + j];
      off += len;
      end = s + len;
    }
  }
  async function stepTo() {
    while (cur !== target) {
      const fwd = cur < target, i = fwd ? cur + 1 : cur;
      const [w, r] = await record(i);
      applyXor(w, whoBytes, 2);
      applyXor(r, refs, 1);
      cur = fwd ? cur + 1 : cur - 1;
    }
    showSnapshot();
  }
  function goto(i) {
    target = Math.max(0, Math.min(SN.length - 1, i));
    chain = chain.then(stepTo).catch(fail);
    return chain;
  }
  function fail(e) {
    console.error(e);
    $("hover").textContent = "cannot show this snapshot: " + e;
  }

  // ---- large pages, sharers, disagreements of the current snapshot (lists carried as given) ----
  const snap = () => SN[Math.max(cur, 0)];
  const longest = new WeakMap(); // list -> its longest run
  function findRun(list, f) { // list of [first, count, ...] sorted by first: the runs holding f
    if (!longest.has(list)) longest.set(list, list.reduce((m, r) => Math.max(m, r[1]), 0));
    const reach = longest.get(list);
    let lo = 0, hi = list.length;
    while (lo < hi) { const m = (lo + hi) >> 1; if (list[m][0] <= f) lo = m + 1; else hi = m; }
    const out = [];
    for (let i = lo - 1; i >= 0 && out.length < 8 && list[i][0] + reach > f; i--) {
      if (list[i][0] + list[i][1] > f) out.push(list[i]);
    }
    return out;
  }

  // ---- the view: scale s (device px per frame; 1/k when a pixel covers k x k frame places) ----
  const cv = $("grid"), ctx = cv.getContext("2d");
  const view = { s: 1, ox: 0, oy: 0 };
  let focus = -1; // an owner code picked out, or -1
  const opt = { mode: "owner", agg: "notable", disagree: true, large: true };
  const gapOf = (s) => (s >= 4 ? 2 : s >= 2 ? 1 : 0);
  const pitchX = (s) => TW * s + gapOf(s), pitchY = (s) => TH * s + gapOf(s);
  function unitX(ux) { return view.s >= 1 ? view.ox + Math.floor(ux / TW) * pitchX(view.s) + (ux % TW) * view.s : view.ox + ux * view.s; }
  function unitY(uy) { return view.s >= 1 ? view.oy + Math.floor(uy / TH) * pitchY(view.s) + (uy % TH) * view.s : view.oy + uy * view.s; }
  function unitsOf(f) {
    const b = Math.floor(f / B), o = f - b * B;
    return [(b % T) * TW + (o & (TW - 1)), Math.floor(b / T) * TH + (o >> TWB)];
  }
  function frameAt(ux, uy) {
    if (ux < 0 || uy < 0 || ux >= WORLD_W || uy >= WORLD_H) return -1;
    const b = (uy >> THB) * T + (ux >> TWB);
    const f = b * B + ((uy & (TH - 1)) << TWB) + (ux & (TW - 1));
    return f < N ? f : -1;
  }
  function worldW(s) { return s >= 1 ? T * pitchX(s) : WORLD_W * s; }
  function worldH(s) { return s >= 1 ? TROWS * pitchY(s) : WORLD_H * s; }
  function screenToUnit(x, y) { // device px -> [ux, uy] (or null in a gap)
    const s = view.s;
    let wx = x - view.ox, wy = y - view.oy;
    if (s < 1) return [Math.floor(wx / s), Math.floor(wy / s)];
    const px = pitchX(s), py = pitchY(s);
    const tx = Math.floor(wx / px), ty = Math.floor(wy / py);
    const ix = wx - tx * px, iy = wy - ty * py;
    if (ix >= TW * s || iy >= TH * s) return null;
    return [tx * TW + Math.floor(ix / s), ty * TH + Math.floor(iy / s)];
  }
  function frameRect(f) { // device px [x, y, w, h] of frame f at the current zoom
    const [ux, uy] = unitsOf(f);
    const w = Math.max(view.s, 1);
    return [unitX(ux), unitY(uy), w, w];
  }

  function resize() {
    const box = $("canvasbox"), dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, box.clientWidth), h = Math.max(50, box.clientHeight);
    cv.style.width = w + "px";
    cv.style.height = h + "px";
    cv.width = Math.round(w * dpr);
    cv.height = Math.round(h * dpr);
  }
  function fit() {
    const s = fitScale(WORLD_W, WORLD_H, cv.width - 8, cv.height - 8);
    view.s = s;
    view.ox = Math.floor((cv.width - worldW(s)) / 2);
    view.oy = Math.floor((cv.height - worldH(s)) / 2);
  }
  function zoomAt(factor, x, y) {
    const s0 = view.s;
    let s1;
    if (s0 >= 1) s1 = factor > 1 ? Math.min(64, s0 * 2) : s0 >= 2 ? Math.floor(s0 / 2) : 1 / 2;
    else { const k = Math.round(1 / s0); s1 = factor > 1 ? (k <= 2 ? 1 : 1 / Math.floor(k / 2)) : 1 / Math.min(4096, k * 2); }
    if (s1 === s0) return;
    const u = screenToUnit(x, y) || screenToUnit(x + 2, y + 2) || [0, 0];
    view.s = s1;
    view.ox = 0; view.oy = 0;
    view.ox = Math.round(x - unitX(u[0]));
    view.oy = Math.round(y - unitY(u[1]));
    draw();
  }
  function centreOn(f, s) { // zoom s (device px per frame), frame f in the middle
    view.s = s;
    view.ox = 0; view.oy = 0;
    const [ux, uy] = unitsOf(f);
    view.ox = Math.round(cv.width / 2 - unitX(ux));
    view.oy = Math.round(cv.height / 2 - unitY(uy));
    draw();
  }

  // ---- drawing ----
  function colourOf(f) {
    const c = who[f];
    if (opt.mode === "refs") return c === U_FREE || c >= OB || c === U_UNKNOWN ? refsColour(refs[f]) : REFS_OTHER[c];
    return focus >= 0 && c !== focus ? dim[c] : base[c];
  }
  function draw() {
    const W = cv.width, Hh = cv.height;
    if (!W || !Hh) return;
    const img = ctx.createImageData(W, Hh);
    const px = new Uint32Array(img.data.buffer);
    px.fill(BG);
    if (view.s >= 1) drawFine(px, W, Hh); else drawCoarse(px, W, Hh);
    ctx.putImageData(img, 0, 0);
    if (opt.large) drawLarge();
    if (opt.disagree) drawDisagree();
    if (view.s >= 12) drawGlyphs();
    const s = view.s;
    $("zoom-label").textContent = s >= 1 ? `${s} px/frame` : `${1 / s}\u00d7${1 / s} frames/px`;
    $("scale-note").textContent = (s >= 1
      ? `one frame = ${s}\u00d7${s} device pixels; tiles are ${B}-frame blocks (${sizeOf(B * H.page_size)}, the large page), ${TW} frames wide; frames run left to right, then down`
      : `one pixel covers up to ${(1 / s) * (1 / s)} frames and shows ${opt.agg === "notable" ? "the most notable of them (clients, then kernel used, kernel shared, kernel free, user free)" : "their most common owner"}; zoom in for single frames`)
      + `. RAM: ${N.toLocaleString("en-US")} frames of ${H.page_size / 1024} KiB in ${NB.toLocaleString("en-US")} blocks, ${T} a row.`;
  }
  function drawFine(px, W, Hh) {
    const s = view.s, pxX = pitchX(s), pyY = pitchY(s), tws = TW * s, ths = TH * s;
    const colU = new Int32Array(W).fill(-1), colL = new Uint8Array(W);
    for (let x = 0; x < W; x++) {
      const wx = x - view.ox;
      if (wx < 0) continue;
      const tx = Math.floor(wx / pxX), ix = wx - tx * pxX;
      if (tx >= T || ix >= tws) continue;
      const l = Math.floor(ix / s);
      colU[x] = tx * TW + l;
      colL[x] = ix - l * s;
    }
    const marks = s >= 4 && s < 12 && opt.mode === "owner", stripes = s >= 4 && opt.mode === "owner";
    for (let y = 0; y < Hh; y++) {
      const wy = y - view.oy;
      if (wy < 0) continue;
      const ty = Math.floor(wy / pyY), iy = wy - ty * pyY;
      if (ty >= TROWS || iy >= ths) continue;
      const l = Math.floor(iy / s), ly = iy - l * s;
      const rowBase = ty * T, within = l << TWB;
      const row = y * W;
      for (let x = 0; x < W; x++) {
        const ux = colU[x];
        if (ux < 0) continue;
        const f = (rowBase + (ux >> TWB)) * B + within + (ux & (TW - 1));
        if (f >= N) continue;
        let c = colourOf(f);
        if (stripes || marks) {
          const code = who[f], lx = colL[x];
          const r = refs[f];
          if (stripes && r >= 2 && code !== K_SHARED) {
            const period = r >= 4 ? 3 : r === 3 ? 4 : 6;
            if ((lx + ly) % period === 0) c = focus >= 0 && code !== focus ? c : stripe[code];
          } else if (marks && MARK[code]) {
            const m = MARK[code], h = s >> 1;
            const on = m === 1 ? (lx === ly || lx === s - 1 - ly) : m === 2 ? (Math.abs(lx - h + 0.5) < s / 6 + 0.5 && Math.abs(ly - h + 0.5) < s / 6 + 0.5) : (ly === h || ly === h - 1) && lx > 0 && lx < s - 1;
            if (on) c = focus >= 0 && code !== focus ? c : mix(ink[code], base[code], 0.35);
          }
        }
        px[row + x] = c;
      }
    }
    if (gapOf(s)) { // the gaps between blocks: a darker line marks each pageblock boundary
      for (let y = 0; y < Hh; y++) {
        const wy = y - view.oy;
        if (wy < 0 || wy >= TROWS * pyY) continue;
        const inGapY = wy % pyY >= ths, row = y * W;
        for (let x = 0; x < W; x++) {
          const wx = x - view.ox;
          if (wx < 0 || wx >= T * pxX) continue;
          if (inGapY || wx % pxX >= tws) px[row + x] = GAP;
        }
      }
    }
  }
  function drawCoarse(px, W, Hh) {
    const k = Math.round(1 / view.s);
    const counts = new Int32Array(NCODES), touched = [];
    const refsMode = opt.mode === "refs", notable = opt.agg === "notable";
    for (let y = 0; y < Hh; y++) {
      const uy0 = (y - view.oy) * k;
      if (uy0 < 0 || uy0 >= WORLD_H) continue;
      const row = y * W;
      for (let x = 0; x < W; x++) {
        const ux0 = (x - view.ox) * k;
        if (ux0 < 0 || ux0 >= WORLD_W) continue;
        let best = -1, bestRank = -1, maxRefs = 0, bestCount = 0, any = false, f0 = -1;
        for (let dy = 0; dy < k; dy++) {
          const uy = uy0 + dy;
          if (uy >= WORLD_H) break;
          const rb = (uy >> THB) * T, within = (uy & (TH - 1)) << TWB;
          for (let dx = 0; dx < k; dx++) {
            const ux = ux0 + dx;
            if (ux >= WORLD_W) break;
            const f = (rb + (ux >> TWB)) * B + within + (ux & (TW - 1));
            if (f >= N) continue;
            any = true;
            const c = who[f];
            if (refsMode) {
              if (f0 < 0 || refs[f] > maxRefs || (rank[c] > rank[who[f0]] && refs[f] >= maxRefs)) { f0 = f; maxRefs = refs[f]; }
            } else if (notable) {
              const r = focus >= 0 ? (c === focus ? 9 : rank[c]) : rank[c];
              if (r > bestRank) { bestRank = r; best = c; }
            } else {
              if (counts[c] === 0) touched.push(c);
              const n = ++counts[c];
              if (n > bestCount) { bestCount = n; best = c; }
            }
          }
        }
        if (!any) continue;
        if (refsMode) { px[row + x] = colourOf(f0); continue; }
        if (!notable) { for (const c of touched) counts[c] = 0; touched.length = 0; }
        px[row + x] = focus >= 0 && best !== focus ? dim[best] : base[best];
      }
    }
  }
  function visibleUnits() {
    const a = screenToUnitLoose(0, 0), b = screenToUnitLoose(cv.width, cv.height);
    return [Math.max(0, a[0]), Math.max(0, a[1]), Math.min(WORLD_W - 1, b[0]), Math.min(WORLD_H - 1, b[1])];
  }
  function screenToUnitLoose(x, y) {
    const s = view.s, wx = x - view.ox, wy = y - view.oy;
    if (s < 1) return [Math.floor(wx / s), Math.floor(wy / s)];
    return [Math.floor(wx / pitchX(s)) * TW + Math.min(TW - 1, Math.floor((wx % pitchX(s)) / s)),
      Math.floor(wy / pitchY(s)) * TH + Math.min(TH - 1, Math.floor((wy % pitchY(s)) / s))];
  }
  function drawGlyphs() {
    const s = view.s, [x0, y0, x1, y1] = visibleUnits();
    ctx.font = `600 ${Math.floor(s * 0.55)}px ui-monospace, "DejaVu Sans Mono", monospace`;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (let uy = y0; uy <= y1; uy++) {
      for (let ux = x0; ux <= x1; ux++) {
        const f = frameAt(ux, uy);
        if (f < 0) continue;
        const c = who[f];
        let g = opt.mode === "refs" && (c === U_FREE || c >= OB || c === U_UNKNOWN) ? (refs[f] ? String(refs[f]) : "") : glyphOf[c];
        if (!g) continue;
        const X = unitX(ux), Y = unitY(uy);
        ctx.fillStyle = opt.mode === "refs" ? (refs[f] >= 3 ? "#FFFFFF" : "#000000") : (focus >= 0 && c !== focus ? "#999999" : textOn(hexOf[c]));
        ctx.fillText(g, X + s / 2, Y + s / 2 + 0.5);
        if (s >= 24 && refs[f] >= 2 && opt.mode === "owner") {
          ctx.save();
          ctx.font = `${Math.floor(s * 0.3)}px ui-monospace, monospace`;
          ctx.textAlign = "right";
          ctx.fillText("\u00d7" + refs[f], X + s - 2, Y + s * 0.8);
          ctx.restore();
        }
      }
    }
  }
  function tileBox(b) {
    const tx = b % T, ty = Math.floor(b / T), s = view.s;
    if (s >= 1) return [view.ox + tx * pitchX(s), view.oy + ty * pitchY(s), TW * s, TH * s];
    return [view.ox + tx * TW * s, view.oy + ty * TH * s, TW * s, TH * s];
  }
  function largeBox(first, pages) {
    const b0 = Math.floor(first / B), b1 = Math.floor((first + pages - 1) / B);
    const a = tileBox(b0), z = tileBox(b1);
    if (Math.floor(b0 / T) === Math.floor(b1 / T)) return [a[0], a[1], z[0] + z[2] - a[0], z[1] + z[3] - a[1]];
    const l = tileBox(Math.floor(b0 / T) * T), r = tileBox(Math.floor(b0 / T) * T + T - 1);
    return [l[0], a[1], r[0] + r[2] - l[0], z[1] + z[3] - a[1]];
  }
  function drawLarge() {
    const list = snap().large || [];
    if (!list.length) return;
    const tile = tileBox(0);
    if (tile[2] < 4) return;
    ctx.save();
    const lw = tile[2] >= 24 ? 2 : 1;
    ctx.lineWidth = lw;
    for (const [first, pages, owner] of list) {
      const [x, y, w, h] = largeBox(first, pages);
      if (x > cv.width || y > cv.height || x + w < 0 || y + h < 0) continue;
      // inset outlines in the colour that reads on the owner's; neighbours alternate solid and dashed,
      // so two adjacent large pages never merge into one
      const ink = focus >= 0 && OB + owner !== focus ? "#777777" : textOn(hexOf[OB + owner] || "#000000");
      ctx.strokeStyle = ink;
      ctx.setLineDash((Math.floor(first / B) & 1) ? [Math.max(3, lw * 3), Math.max(2, lw * 2)] : []);
      ctx.strokeRect(x + lw / 2 + 1, y + lw / 2 + 1, w - lw - 2, h - lw - 2);
      if (tile[2] >= 40) {
        ctx.fillStyle = ink;
        ctx.font = `600 ${Math.min(13, Math.floor(tile[3] / 4))}px ui-monospace, monospace`;
        ctx.textAlign = "left";
        ctx.textBaseline = "top";
        for (const text of [`large ${sizeOf(pages * H.page_size)} ${OWN[owner] ? OWN[owner].tag : "?"}`, sizeOf(pages * H.page_size)]) {
          if (ctx.measureText(text).width <= w - 10) { ctx.fillText(text, x + 5, y + 4); break; }
        }
      }
    }
    ctx.setLineDash([]);
    ctx.restore();
  }
  function drawDisagree() {
    const list = snap().disagree || [];
    if (!list.length) return;
    ctx.save();
    let budget = 200000;
    const s = view.s;
    for (const [first, count] of list) {
      for (let f = first; f < first + count && budget > 0; f++, budget--) {
        const [x, y, w] = frameRect(f);
        if (x > cv.width || y > cv.height || x + w < 0 || y + w < 0) continue;
        if (s >= 4) {
          ctx.lineWidth = 2;
          ctx.strokeStyle = H.disagree_colour;
          ctx.strokeRect(x + 1, y + 1, w - 2, w - 2);
          ctx.lineWidth = 1;
          ctx.strokeStyle = "#000000";
          ctx.strokeRect(x + 2.5, y + 2.5, w - 5, w - 5);
        } else {
          ctx.fillStyle = "#000000";
          ctx.fillRect(Math.floor(x) - 1, Math.floor(y) - 1, 4, 4);
          ctx.fillStyle = H.disagree_colour;
          ctx.fillRect(Math.floor(x), Math.floor(y), 2, 2);
        }
      }
    }
    ctx.restore();
  }

  // ---- panels ----
  function sizeOf(bytes) {
    for (const [u, sh] of [["G", 30], ["M", 20], ["K", 10]]) if (bytes >= 2 ** sh) return `${bytes / 2 ** sh}${u}`;
    return `${bytes}B`;
  }
  const fmtExt = (v) => `${v < 0 ? "-" : ""}${Math.floor(Math.abs(v) / 1000)}.${String(Math.abs(v) % 1000).padStart(3, "0")}`;
  function swatch(code) {
    const hex = hexOf[code];
    return `<span class="sw" style="background:${hex};color:${textOn(hex)}">${esc(glyphOf[code] || "\u00a0")}</span>`;
  }
  function ownerName(i) {
    const o = OWN[i];
    if (!o) return "?";
    return `${o.name}${o.label ? " (" + o.label + ")" : ""}`;
  }
  function showSnapshot() {
    const S = snap(), i = Math.max(cur, 0);
    $("scrub").value = String(i);
    const lab = $("snap-label");
    lab.textContent = `snapshot ${i + 1} of ${SN.length}: ${S.label} (t = ${(+S.t).toFixed(1)} s)` + (S.violation ? " \u2014 VIOLATION" : "");
    lab.className = S.violation ? "violation" : "";
    document.body.dataset.snap = String(i);
    legend(S);
    buddy(S);
    procs(S);
    counts(S);
    audit(S);
    events(S);
    charts(i);
    draw();
    document.body.dataset.ready = "1";
  }
  function legend(S) {
    const present = new Set(S.procs.map((p) => p.owner));
    const rows = [];
    const classes = [[K_USED, "kernel used"], [K_FREE, "kernel free"], [K_SHARED, "kernel shared (boot image, RAM disk, firmware; read-only)"],
      [U_FREE, "user free"], [NOT_RAM, "not RAM (hole, reserved)"], [U_UNKNOWN, "user mapped, by no mapping found (it changed while the snapshot was read)"]];
    for (const [code, text] of classes) {
      if (code === U_UNKNOWN && !S.counts.owner_unknown) continue;
      const n = { [K_USED]: S.counts.kernel_used, [K_FREE]: S.counts.kernel_free, [K_SHARED]: S.counts.kernel_shared, [U_FREE]: S.counts.user_free, [NOT_RAM]: S.counts.not_ram, [U_UNKNOWN]: S.counts.owner_unknown }[code];
      rows.push(`<tr data-code="${code}" class="${focus === code ? "focus" : ""}"><td>${swatch(code)}</td><td class="wrap">${esc(text)}</td><td>${n === undefined ? "" : fmt(n) + " frames"}</td></tr>`);
    }
    const shown = OWN.map((o, i) => i).filter((i) => present.has(i));
    for (const i of shown) {
      const p = S.procs.find((q) => q.owner === i);
      rows.push(`<tr data-code="${OB + i}" class="${focus === OB + i ? "focus" : ""}"><td>${swatch(OB + i)}</td><td>${esc(ownerName(i))}, pid ${OWN[i].pid}</td><td>${fmt(p ? p.frames : 0)} frames</td></tr>`);
    }
    rows.push(`<tr><td colspan="3" class="note">Shared frames (reference count above 1) are striped, denser for more references; large pages are outlined (neighbours alternate solid and dashed); frames where the mm and the kernel disagree are boxed in magenta and black.</td></tr>`);
    $("legend").innerHTML = rows.join("");
  }
  function buddy(S) {
    const top = S.buddy.user.length - 1;
    let head = "<tr><th>order</th>";
    for (let k = 0; k <= top; k++) head += `<th title="${sizeOf(2 ** k * H.page_size)}">${k}</th>`;
    head += "</tr><tr><th>block</th>";
    for (let k = 0; k <= top; k++) head += `<th>${sizeOf(2 ** k * H.page_size)}</th>`;
    head += "</tr>";
    const row = (tid, who, name) => `<tr><td>${name}</td>` + S[tid][who].map((v, k) => `<td id="${tid}-${who}-${k}">${tid === "buddy" ? v : fmtExt(v)}</td>`).join("") + "</tr>";
    $("buddy").innerHTML = head + row("buddy", "user", "user free") + row("buddy", "kernel", "kernel free");
    $("extfrag").innerHTML = head + row("extfrag", "user", "user") + row("extfrag", "kernel", "kernel");
    let large = 0;
    for (let k = PB; k <= top; k++) large += S.buddy.user[k] * 2 ** (k - PB);
    $("large-free").innerHTML = `Free ${sizeOf(B * H.page_size)} blocks (large pages the mm could map now): <b id="large-free-count">${large}</b>.`;
  }
  function procs(S) {
    const head = "<tr><th>process</th><th>pid</th><th title='4 KiB pages it maps'>pages</th><th>large</th><th title='frames it is the first mapper of'>frames</th><th title='page tables'>tables</th><th>threads</th><th title='endpoints'>endp.</th><th title='kernel frames used / its kernel quota'>kernel</th><th title='user pages the mm granted'>quota</th></tr>";
    const rows = S.procs.map((p) => `<tr data-code="${OB + p.owner}"><td>${p.owner >= 0 ? swatch(OB + p.owner) : ""} ${esc(p.owner >= 0 ? ownerName(p.owner) : "?")}</td><td>${p.pid}</td><td>${fmt(p.pages)}</td><td>${fmt(p.large_pages)}</td><td>${fmt(p.frames)}</td><td>${fmt(p.tables)}</td><td>${fmt(p.threads)}</td><td>${fmt(p.endpoints)}</td><td>${fmt(p.kernel_used)}/${fmt(p.kernel_limit)}</td><td>${fmt(p.user_quota)}</td></tr>`);
    $("procs").innerHTML = head + (rows.join("") || "<tr><td colspan='10' class='note'>no client processes</td></tr>");
  }
  function counts(S) {
    const C = S.counts, ram = N - C.not_ram;
    const rows = [["kernel free", C.kernel_free, K_FREE], ["kernel used", C.kernel_used, K_USED], ["kernel shared", C.kernel_shared, K_SHARED],
      ["user free", C.user_free, U_FREE], ["user mapped", C.user_mapped, -1], ["of which shared (refs > 1)", C.user_shared, -1], ["not RAM", C.not_ram, NOT_RAM]];
    $("counts").innerHTML = "<tr><th>class</th><th>frames</th><th>MiB</th><th>% of RAM</th></tr>" + rows.map(([name, v, code]) =>
      `<tr><td>${code >= 0 ? swatch(code) : ""} ${esc(name)}</td><td id="count-${name.split(" ").join("-")}">${fmt(v)}</td><td>${(v * H.page_size / 1048576).toFixed(1)}</td><td>${code === NOT_RAM ? "" : (100 * v / Math.max(1, ram)).toFixed(1)}</td></tr>`).join("");
  }
  function audit(S) {
    const A = S.audit;
    let h = "";
    if (!A) h = `<p class="note">No audit with this snapshot${S.mm_error ? " (the mm: " + esc(S.mm_error) + ")" : ""}.</p>`;
    else {
      h = `<p>${A.divergences ? `<span class="violation-text">${fmt(A.divergences)} frame(s) disagree</span>` : "the views agree on every frame"}; ${fmt(A.pending)} pending intent(s).</p>`;
      const cls = Object.entries(A.class_counts || {}).filter(([, v]) => v);
      if (cls.length) {
        const text = Object.fromEntries(H.disagree_classes);
        h += "<ul>" + cls.map(([k, v]) => `<li>${esc(text[k] || k)}: ${fmt(v)}</li>`).join("") + "</ul>";
        h += `<p class="runs">${(S.disagree || []).slice(0, 12).map(([f, c, k]) => `${f}+${c} (${esc(H.disagree_classes[k][0])})`).join(", ")}</p>`;
        if (!A.complete) h += `<p class="note">The mm's audit names the first 32 runs of each kind; while requests are in flight a difference may be momentary.</p>`;
      }
    }
    $("audit").innerHTML = h;
  }
  function events(S) {
    const items = [];
    if (S.violation) items.push(`<li class="violation-text">VIOLATION: ${esc(S.violation)}</li>`);
    for (const e of S.events || []) items.push(`<li>${esc(e)}</li>`);
    $("events").innerHTML = items.join("") || "<li class='note'>nothing recorded</li>";
  }
  function chart(svg, series, marks, i, unit) {
    const W = svg.clientWidth || 440, Hc = svg.clientHeight || 130, L = 44, R = 6, Tp = 8, Bt = 16;
    const ts = SN.map((s) => +s.t), t0 = ts[0], t1 = Math.max(ts[ts.length - 1], t0 + 1e-9);
    let ymax = 1;
    for (const s of series) for (const v of s.values) if (v !== null && v > ymax) ymax = v;
    for (const m of marks) if (m.value > ymax) ymax = m.value;
    ymax *= 1.08;
    const X = (t) => L + (W - L - R) * (t - t0) / (t1 - t0), Y = (v) => Tp + (Hc - Tp - Bt) * (1 - v / ymax);
    let h = `<line x1="${L}" y1="${Y(0)}" x2="${W - R}" y2="${Y(0)}" stroke="#999"/><text x="${L - 4}" y="${Y(ymax / 1.08) + 3}" text-anchor="end">${Math.round(ymax / 1.08)}</text><text x="${L - 4}" y="${Y(0) + 3}" text-anchor="end">0</text>`;
    for (const m of marks) h += `<line x1="${L}" x2="${W - R}" y1="${Y(m.value)}" y2="${Y(m.value)}" stroke="${m.colour}" stroke-dasharray="${m.dash}"/><text x="${W - R - 2}" y="${Y(m.value) - 2}" text-anchor="end">${esc(m.name)} ${m.value}</text>`;
    for (const s of series) {
      const pts = s.values.map((v, j) => (v === null ? null : `${X(ts[j]).toFixed(1)},${Y(v).toFixed(1)}`)).filter(Boolean).join(" ");
      h += `<polyline fill="none" stroke="${s.colour}" stroke-width="2" stroke-dasharray="${s.dash || ""}" points="${pts}"/>`;
    }
    h += `<line x1="${X(ts[i])}" x2="${X(ts[i])}" y1="${Tp}" y2="${Hc - Bt}" stroke="#000" stroke-width="1"/>`;
    h += `<text x="${L}" y="${Hc - 3}">${t0.toFixed(0)} s</text><text x="${W - R}" y="${Hc - 3}" text-anchor="end">${t1.toFixed(0)} s</text>`;
    h += series.map((s, j) => `<text x="${L + 6 + j * 120}" y="${Tp + 9}" fill="${s.colour}">${s.dash ? "- -" : "\u2014"} ${esc(s.name)}</text>`).join("");
    svg.setAttribute("viewBox", `0 0 ${W} ${Hc}`);
    svg.innerHTML = h;
  }
  function charts(i) {
    const S = SN[i];
    const free = SN.map((s) => (s.pool.kernel_free === null || s.pool.kernel_free === undefined ? null : s.pool.kernel_free));
    const unres = SN.map((s) => (s.pool.kernel_free === null || s.pool.kernel_free === undefined ? null : s.pool.kernel_free - (s.pool.kernel_reserved || 0)));
    const wm = S.watermarks || null;
    const marks = wm ? [["low", wm.low, "#CC3311", "4 2"], ["target", wm.target, "#555555", "2 2"], ["high", wm.high, "#0077BB", "6 3"]]
      .filter(([, v]) => typeof v === "number").map(([name, value, colour, dash]) => ({ name, value, colour, dash })) : [];
    chart($("pool-chart"), [{ name: "kernel free", values: free, colour: "#0077BB" }, { name: "unreserved", values: unres, colour: "#EE7733", dash: "5 3" }], marks, i);
    $("pool-now").textContent = `now: kernel free ${fmt(S.pool.kernel_free)}, reserved for quotas ${fmt(S.pool.kernel_reserved)}` +
      (wm ? `; the mm keeps the unreserved pool between low ${wm.low} and high ${wm.high} (target ${wm.target})` : "; no watermarks (the mm did not answer)");
    const large = SN.map((s) => { let n = 0; for (let k = PB; k < s.buddy.user.length; k++) n += s.buddy.user[k] * 2 ** (k - PB); return n; });
    chart($("large-chart"), [{ name: `free ${sizeOf(B * H.page_size)} blocks`, values: large, colour: "#117733" }], [], i);
  }

  // ---- hover ----
  function hover(ev) {
    const r = cv.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    const u = screenToUnit((ev.clientX - r.left) * dpr, (ev.clientY - r.top) * dpr);
    const f = u ? frameAt(u[0], u[1]) : -1;
    if (f < 0) { $("hover").textContent = " "; return; }
    const S = snap(), c = who[f];
    let t = `frame ${f.toLocaleString("en-US")} (0x${(f * H.page_size).toString(16)})  block ${Math.floor(f / B)}  `;
    t += c >= OB ? `mapped by ${ownerName(c - OB)} pid ${OWN[c - OB].pid}` : H.code_names[c];
    t += `  refs ${refs[f]}${refs[f] === 255 ? "+" : ""}`;
    const sh = findRun(S.sharers || [], f).map((x) => ownerName(x[2]) + " pid " + OWN[x[2]].pid);
    if (sh.length) t += `\nalso mapped by ${sh.join(", ")}`;
    const lg = findRun(S.large || [], f);
    if (lg.length) t += `\nin a large page of ${sizeOf(lg[0][1] * H.page_size)} at frame ${lg[0][0]} (${ownerName(lg[0][2])})`;
    const dg = findRun(S.disagree || [], f);
    if (dg.length) t += `\nDISAGREE: ${H.disagree_classes[dg[0][2]][1]}`;
    $("hover").textContent = t;
  }

  // ---- controls ----
  let playing = null;
  function play() {
    if (playing) { clearInterval(playing); playing = null; $("btn-play").textContent = "play"; return; }
    if (target >= SN.length - 1) goto(0);
    $("btn-play").textContent = "pause";
    playing = setInterval(() => { if (target >= SN.length - 1) play(); else goto(target + 1); }, 700);
  }
  const firstViolation = SN.findIndex((s) => s.violation);
  function wire() {
    $("scrub").max = String(SN.length - 1);
    $("scrub").addEventListener("input", (e) => goto(+e.target.value));
    $("btn-first").onclick = () => goto(0);
    $("btn-prev").onclick = () => goto(target - 1);
    $("btn-next").onclick = () => goto(target + 1);
    $("btn-last").onclick = () => goto(SN.length - 1);
    $("btn-play").onclick = play;
    const bv = $("btn-violation");
    if (firstViolation < 0) { bv.disabled = true; bv.title = "no snapshot is marked as a violation"; }
    else { bv.title = SN[firstViolation].violation; bv.onclick = () => goto(firstViolation); }
    $("zoom-in").onclick = () => zoomAt(2, cv.width / 2, cv.height / 2);
    $("zoom-out").onclick = () => zoomAt(0.5, cv.width / 2, cv.height / 2);
    $("zoom-fit").onclick = () => { fit(); draw(); };
    $("colour-by").onchange = (e) => { opt.mode = e.target.value; draw(); };
    $("aggregate").onchange = (e) => { opt.agg = e.target.value; draw(); };
    $("show-disagree").onchange = (e) => { opt.disagree = e.target.checked; draw(); };
    $("show-large").onchange = (e) => { opt.large = e.target.checked; draw(); };
    const pick = (e) => {
      const tr = e.target.closest("tr[data-code]");
      if (!tr) return;
      const code = +tr.dataset.code;
      focus = focus === code ? -1 : code;
      legend(snap());
      draw();
    };
    $("legend").addEventListener("click", pick);
    $("procs").addEventListener("click", pick);
    cv.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = cv.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
      zoomAt(e.deltaY < 0 ? 2 : 0.5, (e.clientX - r.left) * dpr, (e.clientY - r.top) * dpr);
    }, { passive: false });
    let drag = null;
    cv.addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY, view.ox, view.oy]; });
    window.addEventListener("mouseup", () => { drag = null; });
    cv.addEventListener("mousemove", (e) => {
      if (drag) {
        const dpr = window.devicePixelRatio || 1;
        view.ox = drag[2] + Math.round((e.clientX - drag[0]) * dpr);
        view.oy = drag[3] + Math.round((e.clientY - drag[1]) * dpr);
        draw();
      }
      hover(e);
    });
    window.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
      const k = e.key;
      if (k === "ArrowRight") goto(target + 1);
      else if (k === "ArrowLeft") goto(target - 1);
      else if (k === "Home") goto(0);
      else if (k === "End") goto(SN.length - 1);
      else if (k === " ") { e.preventDefault(); play(); }
      else if (k === "+" || k === "=") zoomAt(2, cv.width / 2, cv.height / 2);
      else if (k === "-") zoomAt(0.5, cv.width / 2, cv.height / 2);
      else if (k === "0") { fit(); draw(); }
    });
    new ResizeObserver(() => { const w = cv.width, h = cv.height; resize(); if (w !== cv.width || h !== cv.height) draw(); }).observe($("canvasbox"));
  }

  $("sysinfo").textContent = `${H.arch}, ${sizeOf(N * H.page_size)} of frame numbers (${N.toLocaleString("en-US")} frames of ${H.page_size / 1024} KiB), large pages ${(H.large_page_sizes || []).map(sizeOf).join(" and ") || "none"}; ${SN.length} snapshot(s)${H.source ? "; from " + H.source : ""}`;
  if (!SN.length) { $("snap-label").textContent = "no snapshot recorded"; return; }
  if (typeof DecompressionStream === "undefined") {
    document.body.insertAdjacentHTML("afterbegin", '<div id="error">This browser cannot inflate the data (no DecompressionStream); use a current Chromium, Firefox or Safari.</div>');
    return;
  }
  resize();
  fit();
  wire();
  // for tests and the curious: where a frame is drawn, in CSS pixels of the page
  window.mmview = {
    goto, centreOn, draw,
    current: () => cur,
    view, layout: { T, TW, TH, B, WORLD_W, WORLD_H },
    frameBox: (f) => {
      const r = cv.getBoundingClientRect(), dpr = window.devicePixelRatio || 1, [x, y, w, h] = frameRect(f);
      return [r.left + x / dpr, r.top + y / dpr, w / dpr, h / dpr];
    },
    code: (f) => who[f], refs: (f) => refs[f],
  };
  goto(0);
})();
