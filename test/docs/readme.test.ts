import { readFileSync, readdirSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { SETTINGS } from "../../src/config/config.js";

const readme = readFileSync(new URL("../../README.md", import.meta.url), "utf8");
const table = readme.slice(readme.indexOf("## Configuration"), readme.indexOf("## Production setup"));
const rows = new Map(
  [...table.matchAll(/^\| `([A-Z_]+)` \| `(--[a-z-]+)` \| (.+?) \| (.+) \|$/gm)].map((m) => [m[1], { flag: m[2], def: m[3] }]),
);

describe("README configuration table", () => {
  it("documents every setting of the config schema with its flag and default", () => {
    for (const [name, s] of Object.entries(SETTINGS)) {
      const row = rows.get(s.env);
      expect(row, `README row for ${s.env}`).toBeDefined();
      expect(row!.flag).toBe("--" + name.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()));
      expect(row!.def).toBe(s.default === "" ? "—" : `\`${s.default}\``);
    }
  });

  it("documents no variable the schema does not know", () => {
    const known = new Set<string>(Object.values(SETTINGS).map((s) => s.env));
    expect([...rows.keys()].filter((env) => !known.has(env))).toEqual([]);
  });
});

describe("README commands", () => {
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { scripts: Record<string, string> };

  it("names start and test commands that package.json defines", () => {
    expect(readme).toContain("npm ci && npm start");
    expect(readme).toMatch(/^npm test$/m);
    expect(pkg.scripts.start).toBeDefined();
    expect(pkg.scripts.test).toBeDefined();
  });

  it("is what .ci/run runs", () => {
    expect(readFileSync(new URL("../../.ci/run", import.meta.url), "utf8")).toMatch(/npm test/);
  });
});

describe("README architecture drawing", () => {
  const section = readme.slice(readme.indexOf("## Architecture"), readme.indexOf("## Changing the API"));
  const drawing = section.slice(section.indexOf("```") + 3, section.indexOf("```", section.indexOf("```") + 3));
  const src = new URL("../../src/", import.meta.url);
  const folders = readdirSync(src, { withFileTypes: true })
    .filter((d) => d.isDirectory())
    .map((d) => d.name);
  const rules = readFileSync(new URL("../../.dependency-cruiser.cjs", import.meta.url), "utf8");

  it("draws every folder of src/, and only those", () => {
    for (const f of folders) expect(drawing, `src/${f}/ in the drawing`).toContain(`src/${f}/`);
    const drawn = [...drawing.matchAll(/src\/([a-z-]+)\//g)].map((m) => m[1]);
    expect(drawn.filter((f) => !folders.includes(f))).toEqual([]);
  });

  it("draws the folders the layering rules name, and names the rules file as their source", () => {
    for (const f of folders) expect(rules, `src/${f} in .dependency-cruiser.cjs`).toMatch(new RegExp(`\\b${f}\\b`));
    expect(section).toContain(".dependency-cruiser.cjs");
  });
});
