// Talking to the device's own API: JSON calls with readable errors, and server-sent event streams.

export async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// POST `body` as JSON and call onEvent(event) for each server-sent event; an `error` event throws.
export async function streamEvents(path, body, signal, onEvent) {
  const response = await api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!block.startsWith("data: ")) continue;
      const event = JSON.parse(block.slice(6));
      if (event.type === "error") throw new Error(event.message);
      onEvent(event);
    }
  }
}

// Ask the server to stop a run (it then ends with its own `done` event); if it has finished meanwhile, stop
// reading instead. `stopPath` is null before the run's first event.
export async function stopRun(stopPath, controller) {
  if (stopPath) {
    try {
      await api(stopPath, { method: "POST" });
      return;
    } catch { /* finished meanwhile */ }
  }
  if (controller) controller.abort();
}
