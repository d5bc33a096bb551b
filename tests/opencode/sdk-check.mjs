// Drives a server with the real @opencode-ai/sdk (v1 and v2 entry points), the flows of
// docs/opencode.md "Checking compatibility with the real SDK". Run by tests/api/opencode.rs:
//   HOTPLEX_URL=http://127.0.0.1:PORT HOTPLEX_KEY=<api key> EXPECT=<reply prefix> node sdk-check.mjs
// (DIRECTORY=<abs path> scopes the clients; ECHO=1 also checks the reply contains the prompt;
// FLOWS=v1:sync,… picks the flows.)
// Prints one JSON line per flow and exits 1 on the first failure (with the reason).
import { createOpencodeClient as createV1 } from "@opencode-ai/sdk";
import { createOpencodeClient as createV2 } from "@opencode-ai/sdk/v2";

const baseUrl = process.env.HOTPLEX_URL;
const key = process.env.HOTPLEX_KEY;
const expect = process.env.EXPECT ?? "";
const directory = process.env.DIRECTORY || undefined;
const headers = { Authorization: "Basic " + Buffer.from(`opencode:${key}`).toString("base64") };

function fail(flow, why) {
  console.log(JSON.stringify({ flow, ok: false, why }));
  process.exit(1);
}

function check(flow, cond, why) {
  if (!cond) fail(flow, why);
}

// Collects a subscription's events; `wait` resolves when a predicate matches one.
function collect(stream) {
  const events = [];
  let waiters = [];
  (async () => {
    for await (const ev of stream) {
      events.push(ev);
      waiters = waiters.filter((w) => {
        const hit = events.find(w.pred);
        if (hit) w.resolve(hit);
        return !hit;
      });
    }
  })().catch(() => {});
  return {
    events,
    wait(pred, ms, what) {
      const hit = events.find(pred);
      if (hit) return Promise.resolve(hit);
      return new Promise((resolve, reject) => {
        waiters.push({ pred, resolve });
        setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
      });
    },
  };
}

const sidOf = (ev) =>
  ev.properties?.sessionID ?? ev.properties?.info?.sessionID ?? ev.properties?.part?.sessionID;

async function flow(version, mode) {
  const name = `${version}:${mode}${directory ? ":dir" : ""}`;
  const v1 = version === "v1";
  const client = (v1 ? createV1 : createV2)({ baseUrl, headers, directory });

  // 1. Subscribe; the first event is server.connected.
  const sub = await client.event.subscribe();
  const feed = collect(sub.stream);
  const first = await feed.wait(() => true, 5000, "the first event").catch((e) => fail(name, e.message));
  check(name, first.type === "server.connected", `first event ${first.type}`);

  // 2. Create with a title; session.created; get returns the same id.
  const title = `sdk ${name}`;
  const created = v1 ? await client.session.create({ body: { title } }) : await client.session.create({ title });
  const session = created.data;
  check(name, session && /^ses_/.test(session.id), `create: ${JSON.stringify(created.error ?? created.data)}`);
  check(name, session.title === title, `title ${session.title}`);
  check(name, typeof session.time?.created === "number", "session.time.created");
  if (directory) check(name, session.directory === directory, `directory ${session.directory}`);
  await feed
    .wait((e) => e.type === "session.created" && e.properties?.info?.id === session.id, 5000, "session.created")
    .catch((e) => fail(name, e.message));
  const got = v1 ? await client.session.get({ path: { id: session.id } }) : await client.session.get({ sessionID: session.id });
  check(name, got.data?.id === session.id, `get: ${JSON.stringify(got.error)}`);

  // 3. Prompt.
  const text = `hello from ${name}`;
  const parts = [{ type: "text", text }];
  let syncReply;
  if (mode === "sync") {
    const r = v1
      ? await client.session.prompt({ path: { id: session.id }, body: { parts } })
      : await client.session.prompt({ sessionID: session.id, parts });
    check(name, r.response.status === 200, `prompt status ${r.response.status}`);
    syncReply = r.data;
    check(name, syncReply?.info?.role === "assistant", `prompt reply ${JSON.stringify(r.data ?? r.error)}`);
  } else {
    const r = v1
      ? await client.session.promptAsync({ path: { id: session.id }, body: { parts } })
      : await client.session.promptAsync({ sessionID: session.id, parts });
    check(name, r.response.status === 204, `prompt_async status ${r.response.status}`);
  }

  // 5. Wait for this session's idle; any error fails.
  await feed
    .wait((e) => e.type === "session.idle" && sidOf(e) === session.id, 60000, "session.idle")
    .catch((e) => fail(name, e.message));
  const mine = feed.events.filter((e) => sidOf(e) === session.id);
  const err = mine.find((e) => e.type === "session.error");
  check(name, !err, `session.error ${JSON.stringify(err?.properties)}`);

  // 4 + 6. Deltas per part; shapes and order.
  const deltas = {};
  for (const e of mine) {
    if (e.type === "message.part.delta" && e.properties.field === "text") {
      deltas[e.properties.partID] = (deltas[e.properties.partID] ?? "") + e.properties.delta;
    } else if (e.type === "message.part.updated" && typeof e.properties.delta === "string") {
      deltas[e.properties.part.id] = (deltas[e.properties.part.id] ?? "") + e.properties.delta;
    }
  }
  const infos = mine.filter((e) => e.type === "message.updated").map((e) => e.properties.info);
  const user = infos.find((i) => i.role === "user");
  check(name, user && /^msg_/.test(user.id) && user.time?.created, "user message.updated");
  const assistants = infos.filter((i) => i.role === "assistant");
  check(name, assistants.length > 0, "no assistant message.updated");
  const last = assistants[assistants.length - 1];
  for (const a of assistants) {
    check(name, typeof a.cost === "number" && typeof a.tokens?.input === "number", "assistant tokens/cost");
    check(name, a.path?.cwd && a.mode && a.parentID === user.id, `assistant shape ${JSON.stringify(a)}`);
  }
  check(name, typeof last.time?.completed === "number", "final assistant lacks time.completed");
  check(name, last.tokens.input > 0 && last.tokens.output > 0, `tokens ${JSON.stringify(last.tokens)}`);
  const idx = (pred) => mine.findIndex(pred);
  const busy = idx((e) => e.type === "session.status" && e.properties.status?.type === "busy");
  const idle = idx((e) => e.type === "session.idle");
  check(name, busy >= 0 && busy < idle, "busy before idle");
  const lastPart = mine.map((e, i) => [e, i]).filter(([e]) => e.type === "message.part.updated" || e.type === "message.part.delta").pop()[1];
  check(name, lastPart < idle, "idle before the last assistant part");

  // 7. Text: deltas add up to the final text part (and to the sync reply).
  const finals = mine.filter((e) => e.type === "message.part.updated" && e.properties.part.type === "text" && e.properties.part.messageID !== user.id && e.properties.part.time?.end);
  check(name, finals.length > 0, "no final text part");
  const final = finals[finals.length - 1].properties.part;
  check(name, deltas[final.id] === final.text, `deltas ${JSON.stringify(deltas[final.id])} vs final ${JSON.stringify(final.text)}`);
  check(name, final.text.startsWith(expect), `reply ${JSON.stringify(final.text)} lacks ${JSON.stringify(expect)}`);
  if (process.env.ECHO === "1") check(name, final.text.includes(text), `reply ${JSON.stringify(final.text)} lacks the prompt`);
  if (syncReply) {
    const t = syncReply.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
    check(name, t === final.text, `sync reply text ${JSON.stringify(t)}`);
    check(name, syncReply.info.id === last.id, "sync reply is not the last assistant message");
  }

  // 8. Messages read back, with tokens.
  const msgs = v1 ? await client.session.messages({ path: { id: session.id } }) : await client.session.messages({ sessionID: session.id });
  check(name, Array.isArray(msgs.data) && msgs.data.length >= 2, `messages ${JSON.stringify(msgs.error)}`);
  const u = msgs.data.find((m) => m.info.role === "user");
  const a = msgs.data.filter((m) => m.info.role === "assistant").pop();
  check(name, u.parts.some((p) => p.type === "text" && p.text === text), "user message text");
  check(name, a.parts.some((p) => p.type === "text" && p.text === final.text), "assistant message text");
  check(name, a.info.tokens.output > 0, "assistant message tokens");
  console.log(JSON.stringify({ flow: name, ok: true, session: session.id, deltas: Object.keys(deltas).length }));
}

const flows = (process.env.FLOWS ?? "v1:sync,v1:async,v2:async,v2:sync").split(",");
for (const f of flows) {
  const [version, mode] = f.split(":");
  await flow(version, mode).catch((e) => fail(f, e.stack ?? String(e)));
}
process.exit(0);
