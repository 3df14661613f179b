// The live view: draws the broker's table from /events (server-sent events of the Watch journal)
// and keeps it current. Every text from the broker goes through textContent, never innerHTML:
// client names and principals are chosen by clients.
'use strict';

(() => {
  const MaxEvents = 50;
  const KindNames = {
    HostBridge: 'host bridge', RootPort: 'root port', SwitchUpstream: 'upstream port',
    SwitchDownstream: 'downstream port', Endpoint: '',
  };
  const state = { boot: null, revision: 0, groups: new Map(), devices: new Map() };
  let source = null;

  const $ = id => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === 'class') node.className = value;
      else if (key.startsWith('data-')) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false)
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setStatus(status, text) {
    document.body.dataset.status = status;
    $('status').textContent = text || status;
  }

  function ownerClass(kind) { return 'owner-' + String(kind).toLowerCase(); }

  function ownerText(g) {
    if (g.owner_kind !== 'USER') return null;
    const who = [`session ${g.owner_session}`];
    if (g.principal) who.push(g.principal);
    if (g.client_name) who.push(g.client_name);
    return who.join(' · ');
  }

  // --- groups ---

  function groupBox(g, changedAt) {
    const devices = el('ul', { class: 'devices' });
    for (const address of g.devices) {
      const d = state.devices.get(address);
      devices.append(el('li', {},
        el('code', {}, address),
        el('span', { class: d && d.driver ? 'driver' : 'driver unbound' }, d ? `${d.model} · ${d.driver || 'no driver'}` : '')));
    }
    const facts = el('dl', {});
    const owner = ownerText(g);
    if (owner) facts.append(el('dt', {}, 'owner'), el('dd', { class: 'owner' }, owner));
    facts.append(
      el('dt', {}, 'count'), el('dd', {}, g.owner_count),
      el('dt', {}, 'generation'), el('dd', { class: 'generation' }, g.generation),
      el('dt', {}, 'domain'), el('dd', { class: 'domain' }, g.domain));
    const box = el('article', { class: 'group', 'data-group': g.id, 'data-owner': g.owner_kind },
      el('header', {}, el('span', { class: 'gid' }, `group ${g.id}`), el('span', { class: `badge ${ownerClass(g.owner_kind)}` }, g.owner_kind)),
      facts, devices);
    if (changedAt !== undefined) {
      box.dataset.changedAt = String(changedAt);
      box.classList.add('changed');
    }
    return box;
  }

  function renderGroups() {
    const boxes = [...state.groups.values()].sort((a, b) => a.id - b.id).map(g => groupBox(g));
    $('groups').replaceChildren(...boxes);
  }

  function renderGroup(id, changedAt) {
    const g = state.groups.get(id);
    const old = document.querySelector(`.group[data-group="${id}"]`);
    if (!g) { if (old) old.remove(); return; }
    const box = groupBox(g, changedAt);
    if (old) { old.replaceWith(box); return; }
    const after = [...document.querySelectorAll('.group')].find(b => Number(b.dataset.group) > id);
    $('groups').insertBefore(box, after || null);
  }

  // --- PCI tree ---

  function renderTree() {
    const children = new Map();
    const roots = [];
    for (const d of [...state.devices.values()].sort((a, b) => a.address.localeCompare(b.address))) {
      if (d.parent && state.devices.has(d.parent)) {
        if (!children.has(d.parent)) children.set(d.parent, []);
        children.get(d.parent).push(d);
      } else {
        roots.push(d);
      }
    }
    const item = d => {
      const g = state.groups.get(d.group_id);
      const kind = KindNames[d.kind] ?? d.kind;
      const node = el('li', { 'data-device': d.address },
        el('div', { class: 'node' },
          el('code', {}, d.address),
          el('span', { class: 'what' }, [kind || d.model, `${d.vendor_id}:${d.device_id}`].join(' · ')),
          el('span', { class: d.driver ? 'driver' : 'driver unbound' }, d.driver || 'no driver'),
          el('span', { class: `chip ${ownerClass(g ? g.owner_kind : 'NONE')}`, title: g ? `group ${g.id}: ${g.owner_kind}` : '' }, `g${d.group_id}`)));
      const below = children.get(d.address);
      if (below) node.append(el('ul', {}, ...below.map(item)));
      return node;
    };
    $('tree').replaceChildren(...roots.map(item));
  }

  // --- events ---

  function describe(type, data) {
    switch (type) {
      case 'group': {
        const owner = ownerText(data);
        return `group ${data.id}: ${data.owner_kind}${owner ? ` (${owner})` : ''}, count ${data.owner_count}, generation ${data.generation}, domain ${data.domain}`;
      }
      case 'device': return `${data.address}: driver ${data.driver || 'unbound'} (group ${data.group_id})`;
      case 'device_removed': return `${data.address} removed`;
      case 'group_removed': return `group ${data.id} removed`;
      case 'session_ended': return `session ${data.session} ended (${data.reason}); all it held is released`;
      default: return type;
    }
  }

  function eventItem(revision, type, data, when) {
    return el('li', { class: when ? 'fresh' : '', 'data-revision': revision },
      el('span', { class: 'rev mono' }, `rev ${revision}`),
      el('span', {}, describe(type, data), when ? el('span', { class: 'when' }, ` · ${when.toLocaleTimeString()}`) : null));
  }

  function addEvent(revision, type, data) {
    const list = $('events');
    list.prepend(eventItem(revision, type, data, new Date()));
    while (list.children.length > MaxEvents) list.lastElementChild.remove();
  }

  function setRevision(revision) {
    state.revision = revision;
    $('revision').textContent = String(revision);
    document.body.dataset.revision = String(revision);
    const users = [...state.groups.values()].filter(g => g.owner_kind === 'USER').length;
    $('counts').textContent = `${state.groups.size} groups · ${state.devices.size} devices · ${users} user-owned`;
  }

  // --- the stream ---

  function onSnapshot(e) {
    const s = JSON.parse(e.data);
    state.boot = s.boot;
    state.groups = new Map(s.groups.map(g => [g.id, g]));
    state.devices = new Map(s.devices.map(d => [d.address, d]));
    renderGroups();
    renderTree();
    $('events').replaceChildren(...s.recent.slice().reverse().map(r => eventItem(r.revision, r.event, r.data)));
    setRevision(s.revision);
  }

  function onChange(type, apply) {
    return e => {
      const receivedAt = Date.now();
      const data = JSON.parse(e.data);
      apply(data, receivedAt);
      addEvent(Number(e.lastEventId), type, data);
      setRevision(Number(e.lastEventId));
    };
  }

  function connect() {
    setStatus('connecting', 'connecting…');
    source = new EventSource('events');
    source.addEventListener('open', () => setStatus('live'));
    source.addEventListener('error', () => {
      if (source.readyState === EventSource.CLOSED) setStatus('closed', 'disconnected: reload the page');
      else setStatus('reconnecting', 'reconnecting…');
    });
    source.addEventListener('snapshot', onSnapshot);
    // A resumed stream from a restarted broker: its revisions are another run's, start over.
    source.addEventListener('resumed', e => {
      if (state.boot !== null && JSON.parse(e.data).boot !== state.boot) {
        source.close();
        connect();
      }
    });
    source.addEventListener('group', onChange('group', (g, at) => {
      state.groups.set(g.id, g);
      renderGroup(g.id, at);
      renderTree();
    }));
    source.addEventListener('device', onChange('device', d => {
      state.devices.set(d.address, d);
      renderTree();
      renderGroup(d.group_id);
    }));
    source.addEventListener('device_removed', onChange('device_removed', r => {
      state.devices.delete(r.address);
      renderTree();
    }));
    source.addEventListener('group_removed', onChange('group_removed', r => {
      state.groups.delete(r.id);
      renderGroup(r.id);
    }));
    source.addEventListener('session_ended', onChange('session_ended', () => { }));
  }

  connect();
})();
