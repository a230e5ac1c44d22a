// emailsvc dashboard: live fragments and confirmed actions. No library, no other host.
//
// An element with data-live="<url>" is refreshed from that URL every few
// seconds while the tab is visible; polling stops while document.hidden and
// resumes (at once) when the tab shows again. A form with data-confirm asks
// first. A fetch that ends on the sign-in page (the session expired) goes there.
(function () {
  'use strict';
  var PERIOD_MS = 1000;
  var timer = null;

  function refresh(element) {
    var url = element.getAttribute('data-live');
    return fetch(url, {credentials: 'same-origin', headers: {'Accept': 'text/html'}})
      .then(function (response) {
        if (response.redirected && response.url.indexOf('/dashboard/login') !== -1) {
          window.location.assign('/dashboard/login');
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null) { element.innerHTML = html; }
      })
      .catch(function () { /* the server is away: try again at the next tick */ });
  }

  function tick() {
    timer = null;
    if (document.hidden) { return; }
    var live = document.querySelectorAll('[data-live]');
    Promise.all(Array.prototype.map.call(live, refresh)).then(schedule, schedule);
  }

  function schedule() {
    if (timer === null && !document.hidden) { timer = window.setTimeout(tick, PERIOD_MS); }
  }

  document.addEventListener('visibilitychange', function () {
    if (document.hidden) {
      if (timer !== null) { window.clearTimeout(timer); timer = null; }
    } else {
      tick();
    }
  });

  document.addEventListener('submit', function (event) {
    var question = event.target.getAttribute('data-confirm');
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  schedule();
}());
