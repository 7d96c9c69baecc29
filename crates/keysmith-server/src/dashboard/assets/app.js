// Keysmith dashboard: the copy button of the one-time key reveal. Everything
// else works without script.
document.addEventListener("click", function (event) {
  var button = event.target.closest("button[data-copy]");
  if (!button) return;
  var field = document.getElementById(button.getAttribute("data-copy"));
  var status = document.getElementById("copy-status");
  if (!field) return;
  var done = function (ok) {
    if (status) status.textContent = ok ? "Copied to the clipboard." : "Select the key and copy it by hand.";
    button.textContent = ok ? "Copied" : "Copy";
  };
  field.focus();
  field.select();
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(function () { done(true); }, function () { done(false); });
  } else {
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    done(ok);
  }
});
