// Forms marked data-confirm="question" ask before they submit (no inline script: the
// console's Content-Security-Policy allows only its own files).
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
