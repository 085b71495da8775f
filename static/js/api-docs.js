// The API reference page: renders /api/openapi.json. Every value from the document reaches
// the page through textContent, never as HTML.

const METHODS = ["get", "put", "post", "patch", "delete", "head", "options"];
const REF_PREFIX = "#/components/schemas/";

// -- small DOM helpers --------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child == null) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

// A line of prose with `code` and **bold** spans, built as nodes.
function inline(text) {
  const span = el("span");
  for (const part of String(text).split(/(`[^`]+`|\*\*[^*]+\*\*)/)) {
    if (!part) continue;
    if (part.startsWith("`") && part.endsWith("`")) span.append(el("code", { text: part.slice(1, -1) }));
    else if (part.startsWith("**") && part.endsWith("**")) span.append(el("strong", { text: part.slice(2, -2) }));
    else span.append(document.createTextNode(part));
  }
  return span;
}

function prose(text) {
  const box = el("div", { class: "prose" });
  for (const paragraph of String(text || "").split(/\n\s*\n/)) {
    if (paragraph.trim()) box.append(el("p", {}, inline(paragraph.replace(/\s*\n\s*/g, " "))));
  }
  return box;
}

// A table that, on a narrow screen, the stylesheet lays out as one block per row, each cell
// under its column's name (`data-label`). The roles keep it a table to assistive
// technology whatever its CSS display.
function table(headings, rows) {
  const head = el("tr", { role: "row" },
    ...headings.map((h) => el("th", { scope: "col", role: "columnheader", text: h })));
  const body = el("tbody", { role: "rowgroup" });
  for (const cells of rows) {
    body.append(el("tr", { role: "row" },
      ...cells.map((c, i) => el("td", { role: "cell", "data-label": headings[i] }, c))));
  }
  return el("div", { class: "table-wrap" },
    el("table", { role: "table" }, el("thead", { role: "rowgroup" }, head), body));
}

function anchor(kind, name) {
  return `${kind}-${String(name).replace(/[^A-Za-z0-9_-]/g, "-")}`;
}

// -- schemas, in words ----------------------------------------------------------------------

function schemaLink(ref) {
  const name = ref.startsWith(REF_PREFIX) ? ref.slice(REF_PREFIX.length) : ref;
  return el("a", { href: `#${anchor("schema", name)}`, class: "schema-name", text: name });
}

function limits(schema) {
  const parts = [];
  if ("minimum" in schema || "maximum" in schema) {
    parts.push(`${schema.minimum ?? "…"} to ${schema.maximum ?? "…"}`);
  }
  if ("minLength" in schema || "maxLength" in schema) {
    parts.push(`${schema.minLength ?? 0} to ${schema.maxLength ?? "…"} characters`);
  }
  if ("maxItems" in schema) parts.push(`at most ${schema.maxItems} items`);
  if (schema.format) parts.push(schema.format);
  return parts;
}

// A node describing `schema`: a link for a named schema, words for the rest.
function describe(schema) {
  const out = el("span");
  if (!schema || Object.keys(schema).length === 0) {
    out.append("any");
    return out;
  }
  if (schema.$ref) {
    out.append(schemaLink(schema.$ref));
  } else if (schema.allOf) {
    schema.allOf.forEach((part, i) => {
      if (i) out.append(", ");
      out.append(describe(part));
    });
  } else if (schema.anyOf || schema.oneOf) {
    (schema.anyOf || schema.oneOf).forEach((part, i) => {
      if (i) out.append(" or ");
      out.append(describe(part));
    });
  } else if (schema.const !== undefined) {
    out.append(el("code", { text: JSON.stringify(schema.const) }));
  } else if (schema.enum) {
    out.append("one of ");
    schema.enum.forEach((value, i) => {
      if (i) out.append(", ");
      out.append(el("code", { text: JSON.stringify(value) }));
    });
  } else if (schema.type === "array") {
    out.append("array of ", describe(schema.items));
  } else if (schema.type === "object" && schema.properties) {
    out.append("object with ");
    Object.entries(schema.properties).forEach(([name, property], i) => {
      if (i) out.append("; ");
      out.append(el("code", { text: name }), ": ", describe(property));
    });
  } else if (schema.type === "object" && schema.additionalProperties) {
    out.append("object of ", describe(schema.additionalProperties));
  } else {
    out.append(String(schema.type || "any"));
  }
  const extra = limits(schema);
  if (extra.length) out.append(` (${extra.join(", ")})`);
  if (schema.pattern) out.append(" matching ", el("code", { text: schema.pattern }));
  return out;
}

function resolveParameter(spec, parameter) {
  if (!parameter.$ref) return parameter;
  const name = parameter.$ref.split("/").pop();
  return spec.components?.parameters?.[name] || parameter;
}

// -- the page ---------------------------------------------------------------------------------

function renderOperation(spec, path, method, operation) {
  const id = anchor("op", operation.operationId || `${method}-${path}`);
  const section = el("section", { class: "panel operation", id, "aria-labelledby": `${id}-title` });
  section.append(
    el("h3", { id: `${id}-title` },
      el("span", { class: `method ${method}`, text: method.toUpperCase() }),
      el("code", { text: path })),
    el("p", { class: "summary", text: operation.summary || "" }),
  );
  if (operation.security?.length) {
    const schemes = operation.security.flatMap((s) => Object.keys(s)).join(", ");
    section.append(el("p", { class: "lock", text: `Needs authentication: ${schemes}` }));
  }
  if (operation.description) section.append(prose(operation.description));

  const parameters = (operation.parameters || []).map((p) => resolveParameter(spec, p));
  if (parameters.length) {
    section.append(el("h4", { text: "Parameters" }), table(
      ["Name", "In", "Schema", "Description"],
      parameters.map((p) => [
        el("span", {}, el("code", { text: p.name }),
          p.required ? el("span", { class: "required", title: "required", text: " *" }) : null),
        p.in,
        describe(p.schema),
        inline(p.description || ""),
      ]),
    ));
  }

  if (operation.requestBody) {
    section.append(el("h4", { text: "Request body" }), table(
      ["Content type", "Schema"],
      Object.entries(operation.requestBody.content || {}).map(([type, media]) => [
        el("code", { text: type }), describe(media.schema),
      ]),
    ));
  }

  section.append(el("h4", { text: "Responses" }), table(
    ["Status", "Description", "Body", "Headers"],
    Object.entries(operation.responses || {}).map(([status, response]) => {
      const body = el("span");
      Object.entries(response.content || {}).forEach(([type, media], i) => {
        if (i) body.append(el("br"));
        body.append(el("code", { text: type }), " ", describe(media.schema));
      });
      const headers = el("span");
      Object.entries(response.headers || {}).forEach(([name, header], i) => {
        if (i) headers.append(el("br"));
        headers.append(el("code", { text: name }), header.required ? "" : " (optional)");
      });
      return [
        el("span", { class: `status-code s${String(status)[0]}`, text: status }),
        inline(response.description || ""),
        body,
        headers,
      ];
    }),
  ));
  return section;
}

function renderSchema(name, schema) {
  const id = anchor("schema", name);
  const section = el("section", { id, "aria-labelledby": `${id}-title` });
  section.append(el("h3", { id: `${id}-title` }, el("code", { text: name })));
  if (schema.description) section.append(prose(schema.description));
  if (schema.properties) {
    const required = new Set(schema.required || []);
    section.append(table(
      ["Field", "Schema", "Description"],
      Object.entries(schema.properties).map(([field, property]) => [
        el("span", {}, el("code", { text: field }),
          required.has(field) ? el("span", { class: "required", title: "required", text: " *" }) : null),
        describe(property),
        inline(property.description || ""),
      ]),
    ));
    if (schema.additionalProperties === false) {
      section.append(el("p", { class: "loading", text: "No other fields are accepted." }));
    }
  } else {
    section.append(el("p", {}, describe(schema)));
  }
  return section;
}

function renderWebsocket(socket) {
  const box = document.getElementById("websocket-body");
  box.append(
    el("p", {}, el("code", { text: `WS ${socket.path}` }), " ", inline(socket.summary || "")),
    el("h3", { text: "Server to client" }),
    el("ul", {}, ...(socket.serverMessages || []).map((m) => el("li", {}, describe(m)))),
    el("h3", { text: "Client to server" }),
    el("ul", {}, ...(socket.clientMessages || []).map((m) => el("li", {}, describe(m)))),
    el("h3", { text: "Close codes" }),
    table(["Code", "Meaning"], Object.entries(socket.closeCodes || {}).map(([code, text]) => [
      code, inline(text),
    ])),
  );
  document.getElementById("websocket").hidden = false;
}

function render(spec) {
  const title = `${spec.info?.title || "API"} ${spec.info?.version || ""}`.trim();
  document.getElementById("title").textContent = title;
  document.title = `${title} — API reference`;
  document.getElementById("description").append(prose(spec.info?.description));
  document.getElementById("intro").hidden = false;

  const byTag = new Map((spec.tags || []).map((t) => [t.name, []]));
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) {
      const operation = item[method];
      if (!operation) continue;
      const tag = operation.tags?.[0] || "Other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, operation]);
    }
  }

  const toc = document.getElementById("toc-groups");
  const operations = document.getElementById("operations");
  const descriptions = new Map((spec.tags || []).map((t) => [t.name, t.description]));
  for (const [tag, entries] of byTag) {
    if (!entries.length) continue;
    const list = el("ul");
    operations.append(el("h2", { id: anchor("tag", tag), text: tag }));
    if (descriptions.get(tag)) operations.append(prose(descriptions.get(tag)));
    for (const [path, method, operation] of entries) {
      const section = renderOperation(spec, path, method, operation);
      operations.append(section);
      list.append(el("li", {}, el("a", { href: `#${section.id}` },
        `${method.toUpperCase()} ${path}`), ` — ${operation.summary || ""}`));
    }
    toc.append(el("div", { class: "toc-group" }, el("strong", { text: tag }), list));
  }
  document.getElementById("toc").hidden = false;

  if (spec["x-websocket"]) renderWebsocket(spec["x-websocket"]);

  const schemaList = document.getElementById("schema-list");
  for (const [name, schema] of Object.entries(spec.components?.schemas || {})) {
    schemaList.append(renderSchema(name, schema));
  }
  document.getElementById("schemas").hidden = false;
}

async function main() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/openapi.json", { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`The server answered ${response.status}.`);
    render(await response.json());
    status.textContent = "";
    status.hidden = true;
    if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
  } catch (error) {
    status.className = "notice";
    status.textContent = `Could not load the API description: ${error.message}`;
  }
}

main();
