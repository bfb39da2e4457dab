// Stitchwork dashboard: live pages. Progressive enhancement only (every page works without this script).
// It listens to /ui/live (a WebSocket carrying "something happened to run X") and fetches the changed parts of
// the page again from the server, which renders and escapes them. Event data is never inserted as markup: this
// script only sets textContent, and swaps in elements parsed from our own server's escaped HTML.
(function () {
  "use strict";
  var live = document.body.getAttribute("data-live") || "";
  if (!live || !("WebSocket" in window)) { return; }
  var status = document.getElementById("live-status");
  var runId = live.indexOf("run:") === 0 ? live.slice(4) : "";
  var timer = null;
  var busy = false;
  var again = false;

  function say(text) { if (status) { status.textContent = text; } }

  function refresh() {
    if (busy) { again = true; return; }
    var parts = document.querySelectorAll("[data-fragment]");
    if (!parts.length) { return; }
    busy = true;
    var jobs = [];
    Array.prototype.forEach.call(parts, function (part) {
      var url = part.getAttribute("data-fragment");
      if (!url || url.charAt(0) !== "/" || url.charAt(1) === "/") { return; }
      if (part.contains(document.activeElement) && document.activeElement.tagName === "INPUT") { return; }
      jobs.push(fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}, redirect: "error"})
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          var parsed = new DOMParser().parseFromString(html, "text/html");
          var fresh = parsed.getElementById(part.id);
          if (fresh && part.parentNode) { part.replaceWith(document.adoptNode(fresh)); }
        }));
    });
    Promise.all(jobs).then(function () { say("live"); }, function () { say("live (refresh failed)"); })
      .then(function () {
        busy = false;
        updateBadge();
        if (again) { again = false; schedule(); }
      });
  }

  function updateBadge() {
    var section = document.getElementById("pending-approvals");
    var badge = document.getElementById("pending-badge");
    if (section && badge) { badge.textContent = section.getAttribute("data-count") || "0"; }
  }

  function schedule() {
    if (timer) { clearTimeout(timer); }
    timer = setTimeout(refresh, 250);
  }

  function relevant(event) {
    if (event.kind === "resync") { return true; }
    if (runId) { return event.run_id === runId; }
    return true;
  }

  var delay = 1000;
  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + "/ui/live");
    socket.onopen = function () { delay = 1000; say("live"); schedule(); };
    socket.onmessage = function (message) {
      var event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (event && relevant(event)) { schedule(); }
    };
    socket.onclose = function (closed) {
      if (closed.code === 4401) { say("signed out"); location.reload(); return; }  // the server shows sign-in
      say("reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }
  connect();
  // Approvals requested outside run events (the HTTP tool door) still show up.
  setInterval(schedule, 15000);
}());
