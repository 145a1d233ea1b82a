// Playground: stream a chat answer from the console's session-authenticated endpoint.
(function () {
  "use strict";
  const form = document.getElementById("chat-form");
  if (!form) return;
  const transcript = document.getElementById("transcript");
  const usageEl = document.getElementById("chat-usage");
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  let history = [];
  let controller = null;

  function bubble(role, textValue) {
    const li = document.createElement("li");
    li.className = role;
    li.textContent = textValue;
    transcript.appendChild(li);
    return li;
  }

  document.getElementById("chat-clear").addEventListener("click", function () {
    history = [];
    transcript.replaceChildren();
    usageEl.textContent = "";
  });
  stop.addEventListener("click", function () { if (controller) controller.abort(); });

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const message = form.message.value.trim();
    if (!message || !send) return;
    const messages = [];
    if (form.system.value.trim()) messages.push({ role: "system", content: form.system.value.trim() });
    history.push({ role: "user", content: message });
    bubble("user", message);
    const answer = bubble("assistant", "");
    answer.setAttribute("aria-busy", "true");
    form.message.value = "";
    send.disabled = true;
    stop.hidden = false;
    usageEl.textContent = "Streaming…";
    controller = new AbortController();
    let text = "";
    let deltas = 0;
    try {
      const seed = form.seed.value.trim();
      const response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "text/event-stream" },
        body: JSON.stringify({
          model: form.model.value,
          messages: messages.concat(history),
          max_tokens: parseInt(form.max_tokens.value, 10) || 64,
          temperature: parseFloat(form.temperature.value),
          seed: seed === "" ? null : parseInt(seed, 10),
        }),
        signal: controller.signal,
      });
      if (!response.ok) {
        const body = await response.json().catch(function () { return {}; });
        throw new Error(body.error || ("HTTP " + response.status));
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).replace(/^data: /, "");
          buffer = buffer.slice(cut + 2);
          const event = JSON.parse(line);
          if (event.delta) {
            text += event.delta;
            answer.textContent = text;
            deltas += 1;
            answer.dataset.deltas = String(deltas);
          }
          if (event.error) throw new Error(event.error);
          if (event.usage) {
            const u = event.usage;
            usageEl.textContent = "Tokens: " + u.prompt_tokens + " prompt + " + u.completion_tokens +
              " completion = " + u.total_tokens + " total (finish: " + event.finish_reason + ")";
            usageEl.dataset.total = String(u.total_tokens);
          }
        }
      }
      history.push({ role: "assistant", content: text });
    } catch (e) {
      answer.classList.add("error");
      answer.textContent = text + (e.name === "AbortError" ? " [stopped]" : " [error: " + e.message + "]");
      if (e.name === "AbortError") usageEl.textContent = "Stopped.";
      else usageEl.textContent = "";
    } finally {
      answer.removeAttribute("aria-busy");
      send.disabled = false;
      stop.hidden = true;
      controller = null;
    }
  });
})();
