// Shared by the control plane's pages: the API token (asked once, kept in sessionStorage, sent as a header,
// never in a URL), JSON calls, and small SVG line charts drawn here (no library, no CDN).
"use strict";
const TOKEN_KEY = "lad-api-token";

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function askToken(message) {
  const box = document.getElementById("token-box");
  box.hidden = false;
  document.getElementById("token-message").textContent = message || "This action needs the API token.";
  return new Promise(resolve => {
    document.getElementById("token-save").onclick = () => {
      sessionStorage.setItem(TOKEN_KEY, document.getElementById("token-input").value.trim());
      document.getElementById("token-input").value = "";
      box.hidden = true;
      resolve();
    };
  });
}

async function api(method, path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = {"Accept": "application/json"};
    if (token()) headers["Authorization"] = "Bearer " + token();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (r.status === 401 && attempt === 0) { await askToken("The API token was refused or is missing."); continue; }
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((data.detail && data.detail.message) || ("HTTP " + r.status));
    return data;
  }
  throw new Error("the API token was refused");
}

function fmt(x, digits) { return Number.isFinite(x) ? x.toFixed(digits) : "-"; }

// series: [{name, points: [[x, y], ...]}]; draws axes' ranges and one polyline per series.
function lineChart(el, title, series, logY) {
  const W = 420, H = 180, L = 52, R = 10, T = 22, B = 24;
  const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]) && (!logY || p[1] > 0));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.dataset.title = title;
  const text = (x, y, s, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor || "start");
    t.textContent = s; svg.appendChild(t);
  };
  text(L, 14, title);
  if (pts.length) {
    const f = v => logY ? Math.log10(v) : v;
    let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
    let y0 = Math.min(...pts.map(p => f(p[1]))), y1 = Math.max(...pts.map(p => f(p[1])));
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 = y0 + 1; }
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => H - B - (f(y) - y0) / (y1 - y0) * (H - T - B);
    const axis = document.createElementNS(ns, "path");
    axis.setAttribute("d", `M${L},${T} V${H - B} H${W - R}`); axis.setAttribute("class", "axis");
    svg.appendChild(axis);
    const show = v => logY ? Math.pow(10, v).toExponential(1) : (Math.abs(v) < 0.01 && v !== 0 ? v.toExponential(1) : v.toFixed(3));
    text(L - 4, T + 8, show(y1), "end"); text(L - 4, H - B, show(y0), "end");
    text(L, H - 6, String(x0)); text(W - R, H - 6, String(x1), "end");
    series.forEach((s, i) => {
      const good = s.points.filter(p => Number.isFinite(p[1]) && (!logY || p[1] > 0));
      if (!good.length) return;
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", good.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
      line.setAttribute("class", "series s" + (i % 6));
      line.dataset.name = s.name;
      svg.appendChild(line);
      if (series.length > 1) text(W - R - 4, T + 12 * (i + 1), s.name, "end");
    });
  } else {
    text(W / 2, H / 2, "no data yet", "middle");
  }
  el.replaceChildren(svg);
}
