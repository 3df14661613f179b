// Opens the broker's live view in Debian's headless Chromium (playwright-core downloads no browser)
// for LiveViewBrowserTests, which talks to it over stdin/stdout:
//   node liveview.mjs <live view url> <screenshot.png> <empty profile dir> [viewer token]
// prints   "ready groups=<n> devices=<n> group14=<owner>"  once the page has drawn the snapshot and is live,
// reads    "claimed <group> <unix ms when the claim began>"  after the test has claimed that group,
// prints   "changed group=<g> owner=USER within_ms=<ms> claim_to_receipt_ms=<ms>"  when the group's box shows
//          USER (it waits at most 1000 ms after being told), saves a full-page screenshot, prints
//          "screenshot <path>" and exits 0. Anything else: a line "error: …" and exit code 1.
// With a token, the browser answers the broker's Basic challenge with it as the password.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const ChangeBudgetMs = 1000;
const LoadTimeoutMs = 30000;
const [url, screenshot, profile, token] = process.argv.slice(2);
if (!url || !screenshot || !profile) {
  console.log('error: usage: node liveview.mjs <url> <screenshot.png> <profile dir> [token]');
  process.exit(1);
}

const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextLine() {
  const { value, done } = await input.next();
  if (done) throw new Error('stdin ended before the test said what it claimed');
  return value.trim();
}

let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    chromiumSandbox: false,
    args: ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1560, height: 980 },
    httpCredentials: token ? { username: 'viewer', password: token } : undefined,
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.on('pageerror', e => console.log(`page error: ${e.message}`));
  page.on('console', m => { if (m.type() === 'error') console.log(`console error: ${m.text()}`); });

  const response = await page.goto(url, { timeout: LoadTimeoutMs });
  if (!response || response.status() !== 200) throw new Error(`GET ${url} answered ${response && response.status()}`);
  await page.waitForFunction(() => document.body.dataset.status === 'live' && document.querySelectorAll('.group').length > 0,
    null, { timeout: LoadTimeoutMs });
  const groups = await page.locator('.group').count();
  const devices = await page.locator('#tree [data-device]').count();
  const before = await page.getAttribute('.group[data-group="14"]', 'data-owner');
  console.log(`ready groups=${groups} devices=${devices} group14=${before}`);

  const [word, group, claimedAt] = (await nextLine()).split(' ');
  if (word !== 'claimed') throw new Error(`expected "claimed <group> <ms>", got "${word}"`);
  const told = performance.now();
  const box = `.group[data-group="${group}"][data-owner="USER"]`;
  await page.waitForSelector(box, { timeout: ChangeBudgetMs });
  const within = performance.now() - told;
  const receivedAt = Number(await page.getAttribute(box, 'data-changed-at'));
  console.log(`changed group=${group} owner=USER within_ms=${within.toFixed(1)} claim_to_receipt_ms=${receivedAt - Number(claimedAt)}`);

  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot ${screenshot}`);
  await context.close();
  process.exit(0);
} catch (e) {
  console.log(`error: ${String(e && e.message || e).split('\n')[0]}`);
  if (context) await context.close().catch(() => { });
  process.exit(1);
}
