using System.Text;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Random operation sequences run against the real core and against <see cref="ReferenceModel"/>, a
/// small independent model of SPEC §3/§4 written from the spec. Every operation's result (errno or
/// success) and the whole resulting state must agree, the §10 invariants must hold after every step,
/// and a rejected call must leave the state and journal untouched. A failure prints the seed and the
/// trace; set <c>DMABROKER_MODEL_SEED=N</c> to run that one sequence again.
/// </summary>
public sealed class ModelBasedTests
{
    private const int Sequences = 10_000;
    private const string SeedVariable = "DMABROKER_MODEL_SEED";

    /// <summary>
    /// Small enough that sessions collide often: a three-function group without ACS (two DMA-API
    /// functions and one vfio-pci), a lone edu device, and a switch whose downstream ports lack ACS
    /// (ports and two edu devices share a group).
    /// </summary>
    private const string SmallTopologyJson = """
        {
          "devices": [
            { "address": "0000:00:00.0", "kind": "host-bridge", "vendorId": "8086", "deviceId": "29c0", "classCode": "060000" },
            { "address": "0000:00:01.0", "kind": "root-port", "acs": true, "secondaryBus": "01", "vendorId": "8086", "deviceId": "7c90", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:00:02.0", "kind": "root-port", "acs": true, "secondaryBus": "02", "vendorId": "8086", "deviceId": "7c91", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:00:03.0", "kind": "root-port", "acs": true, "secondaryBus": "03", "vendorId": "8086", "deviceId": "7c92", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:01:00.0", "vendorId": "8086", "deviceId": "10fb", "classCode": "020000", "model": "nic", "driver": "ixgbe" },
            { "address": "0000:01:00.1", "vendorId": "8086", "deviceId": "10fb", "classCode": "020000", "model": "nic", "driver": "ixgbe" },
            { "address": "0000:01:00.2", "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", "driver": "vfio-pci" },
            { "address": "0000:02:00.0", "acs": true, "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", "driver": "vfio-pci" },
            { "address": "0000:03:00.0", "kind": "switch-upstream", "acs": true, "secondaryBus": "04", "vendorId": "10b5", "deviceId": "8747", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:04:00.0", "kind": "switch-downstream", "secondaryBus": "05", "vendorId": "10b5", "deviceId": "8747", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:04:01.0", "kind": "switch-downstream", "secondaryBus": "06", "vendorId": "10b5", "deviceId": "8747", "classCode": "060400", "driver": "pcieport" },
            { "address": "0000:05:00.0", "acs": true, "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu", "driver": "vfio-pci" },
            { "address": "0000:06:00.0", "acs": true, "vendorId": "1234", "deviceId": "11e8", "classCode": "00ff00", "model": "edu" }
          ]
        }
        """;

    private static readonly string[] DriverChoices = ["vfio-pci", "pcieport", "pci-stub", "nvme", "ixgbe"];

    /// <summary>Outcomes the generator must reach across the run, so the test cannot pass by exercising nothing.</summary>
    private static readonly string[] RequiredOutcomes =
    [
        "BindDriver ok", "BindDriver EBUSY", "UnbindDriver ok", "UnbindDriver EINVAL", "UnbindDriver EBUSY",
        "CreateContainer ok", "CreateContainer UNAUTHENTICATED", "DestroyContainer ok", "DestroyContainer ENOENT", "DestroyContainer EBUSY",
        "SetContainer ok", "SetContainer EINVAL", "SetContainer EPERM", "SetContainer ENOENT",
        // UnsetContainer's EBUSY (a device of the group bound with BindDevice) cannot happen since
        // BindDevice refuses a group held through a container (vfio_device_block_group), and the model opens no handles.
        "UnsetContainer ok", "UnsetContainer EINVAL",
        "BindDevice ok", "BindDevice EPERM", "BindDevice EBUSY", "BindDevice ENODEV", "BindDevice EINVAL", "BindDevice ENOENT",
        "UnbindDevice ok", "UnbindDevice EINVAL",
        "GetGroupStatus ok viable=True set=True", "GetGroupStatus ok viable=True set=False", "GetGroupStatus ok viable=False set=False",
        "EndSession ok", "OpenSession ok",
    ];

    [Fact]
    public async Task RandomSequences_AgainstReferenceModel_AgreeAndKeepInvariants()
    {
        var small = CoreState.ParseTopology(SmallTopologyJson, "small topology");
        var full = TopologyDocument.Default();
        await ModelHarness.RunAsync("model-based sequence", SeedVariable, Sequences, RequiredOutcomes, run =>
        {
            // One sequence in five on the default topology, the rest on the small one.
            var (topology, name) = run.Seed % 5 == 4 ? (full, "default topology") : (small, "small topology");
            var broker = run.Use(new Broker(topology, null, new FakeTimeProvider()), $"on the {name}");
            return new Sequence(run, broker, topology).RunAsync();
        });
    }

    /// <summary>One seeded sequence: the real broker and the model.</summary>
    private sealed class Sequence(ModelRun run, Broker broker, TopologyDocument topology)
    {
        private readonly Random _rng = run.Random;
        private readonly List<Session> _sessions = [];
        private readonly List<ulong> _containerIds = [];
        private readonly Broker _broker = broker;
        private readonly ReferenceModel _model = new(topology, broker.Journal.Current);
        private string _state = CoreState.Render(broker);

        public async Task RunAsync()
        {
            Compare(_state, "initial state");
            await StepAsync(OpKind.OpenSession);
            await StepAsync(OpKind.OpenSession);
            var length = _rng.Next(20, 41);
            for (var i = 0; i < length; i++)
                await StepAsync(NextKind());
            // Ending every session must bring the table back to the kernel's state, as in the model.
            foreach (var s in _sessions.ToArray())
                await StepAsync(OpKind.EndSession, s);
        }

        private enum OpKind
        {
            BindDriver,
            UnbindDriver,
            CreateContainer,
            DestroyContainer,
            SetContainer,
            UnsetContainer,
            BindDevice,
            UnbindDevice,
            GetGroupStatus,
            OpenSession,
            EndSession,
        }

        private static readonly (OpKind Kind, int Weight)[] Weights =
        [
            (OpKind.BindDriver, 14), (OpKind.UnbindDriver, 10), (OpKind.CreateContainer, 8), (OpKind.DestroyContainer, 6),
            (OpKind.SetContainer, 16), (OpKind.UnsetContainer, 10), (OpKind.BindDevice, 16), (OpKind.UnbindDevice, 10),
            (OpKind.GetGroupStatus, 4), (OpKind.OpenSession, 3), (OpKind.EndSession, 3),
        ];

        private OpKind NextKind() => run.Pick(Weights);

        private async Task StepAsync(OpKind kind, Session? endThis = null)
        {
            var before = _state;
            var revision = _broker.Journal.Current.Revision;
            var actual = await run.StepAsync(kind, () => RunAsync(kind, endThis));
            var after = _state = CoreState.Render(_broker);
            if (actual != "ok" && !actual.StartsWith("ok ", StringComparison.Ordinal))
            {
                if (after != before)
                    Fail($"rejected call changed the state (SPEC §9, §10.6):\n{Diff(before, after)}");
                if (_broker.Journal.Current.Revision != revision)
                    Fail("rejected call published a change");
            }
            if (CoreState.Violations(_broker) is { Count: > 0 } problems)
                Fail("SPEC §10 invariants violated:\n" + CoreState.Format(problems));
            Compare(after, "after the last step");
        }

        private void Compare(string real, string when)
        {
            var model = _model.Render();
            if (real != model)
                Fail($"core and model disagree {when} (- model, + core):\n{Diff(model, real)}");
        }

        private async Task<(string Description, string Actual, string Expected)> RunAsync(OpKind kind, Session? endThis)
        {
            switch (kind)
            {
                case OpKind.OpenSession:
                {
                    var s = _broker.Sessions.Open();
                    _sessions.Add(s);
                    _model.OpenSession(s.Id);
                    return ($"OpenSession() = s{s.Id}", "ok", "ok");
                }
                case OpKind.EndSession:
                {
                    var s = endThis ?? PickSession();
                    await _broker.Sessions.EndAsync(s, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);
                    return ($"EndSession(s{s.Id})", "ok", _model.EndSession(s.Id));
                }
                case OpKind.BindDriver:
                {
                    var address = PickDevice(boundOnly: false);
                    var driver = DriverChoices[_rng.Next(DriverChoices.Length)];
                    return ($"BindDriver({address}, {driver})",
                        Outcome(() => _broker.Table.BindDriver(address, driver)), _model.BindDriver(address, driver));
                }
                case OpKind.UnbindDriver:
                {
                    var address = PickDevice(boundOnly: _rng.Next(4) == 0);
                    return ($"UnbindDriver({address})", Outcome(() => _broker.Table.UnbindDriver(address)), _model.UnbindDriver(address));
                }
                case OpKind.CreateContainer:
                {
                    var s = PickSession();
                    var type = _rng.Next(2) == 0 ? ContainerType.Type1v2 : ContainerType.Iommufd;
                    ulong id = 0;
                    var actual = Outcome(() => id = _broker.Vfio.CreateContainer(s, type).Id);
                    if (actual == "ok")
                        _containerIds.Add(id);
                    return ($"s{s.Id}.CreateContainer({type}) = c{id}", actual, _model.CreateContainer(s.Id, id));
                }
                case OpKind.DestroyContainer:
                {
                    var s = PickSession();
                    var c = PickContainer(s);
                    return ($"s{s.Id}.DestroyContainer(c{c})", Outcome(() => _broker.Vfio.DestroyContainer(s, c)), _model.DestroyContainer(s.Id, c));
                }
                case OpKind.SetContainer:
                {
                    var s = PickSession();
                    var g = PickGroup(setOnly: false);
                    var c = PickContainer(s);
                    return ($"s{s.Id}.SetContainer(g{g}, c{c})", Outcome(() => _broker.Vfio.SetContainer(s, g, c)), _model.SetContainer(s.Id, g, c));
                }
                case OpKind.UnsetContainer:
                {
                    var s = PickSession();
                    var g = PickGroup(setOnly: _rng.Next(3) > 0);
                    return ($"s{s.Id}.UnsetContainer(g{g})", Outcome(() => _broker.Vfio.UnsetContainer(s, g)), _model.UnsetContainer(s.Id, g));
                }
                case OpKind.BindDevice:
                {
                    var s = PickSession();
                    var address = PickDevice(boundOnly: false);
                    var c = PickContainer(s);
                    return ($"s{s.Id}.BindDevice({address}, c{c})", Outcome(() => _broker.Vfio.BindDevice(s, address, c)), _model.BindDevice(s.Id, address, c));
                }
                case OpKind.UnbindDevice:
                {
                    var s = PickSession();
                    var address = PickDevice(boundOnly: _rng.Next(3) > 0);
                    return ($"s{s.Id}.UnbindDevice({address})", Outcome(() => _broker.Vfio.UnbindDevice(s, address)), _model.UnbindDevice(s.Id, address));
                }
                case OpKind.GetGroupStatus:
                {
                    var s = PickSession();
                    var g = PickGroup(setOnly: _rng.Next(2) == 0);
                    var status = default(GroupStatus);
                    var actual = Outcome(() => status = _broker.Vfio.GetGroupStatus(s, g));
                    if (actual == "ok")
                        actual = $"ok viable={status.Viable} set={status.ContainerSet}";
                    return ($"s{s.Id}.GetGroupStatus(g{g})", actual, _model.GetGroupStatus(s.Id, g));
                }
                default:
                    throw new ArgumentOutOfRangeException(nameof(kind));
            }
        }

        private static string Outcome(Action call) => ModelRun.Outcome(call);

        /// <summary>Mostly a live session; now and then an ended one.</summary>
        private Session PickSession()
        {
            var live = _sessions.Where(s => s.EndReason is null).ToList();
            return live.Count > 0 && _rng.Next(10) > 0 ? live[_rng.Next(live.Count)] : _sessions[_rng.Next(_sessions.Count)];
        }

        /// <summary>Mostly one of the session's own live containers; else anyone's, destroyed ones included, or an id never issued.</summary>
        private ulong PickContainer(Session s)
        {
            var roll = _rng.Next(10);
            var own = _model.ContainersOf(s.Id);
            if (roll < 7 && own.Count > 0)
                return own[_rng.Next(own.Count)];
            if (roll < 9 && _containerIds.Count > 0)
                return _containerIds[_rng.Next(_containerIds.Count)];
            return 10_000ul + (ulong)_rng.Next(3);
        }

        private uint PickGroup(bool setOnly)
        {
            var candidates = setOnly ? _model.GroupsWithContainerSet() : [];
            if (candidates.Count == 0)
                candidates = _model.GroupIds;
            return _rng.Next(20) == 0 ? 999u : candidates[_rng.Next(candidates.Count)];
        }

        private PciAddress PickDevice(bool boundOnly)
        {
            var candidates = boundOnly ? _model.BoundDevices() : [];
            if (candidates.Count == 0)
                candidates = _model.DeviceAddresses;
            return candidates[_rng.Next(candidates.Count)];
        }

        private void Fail(string why) => run.Fail(why);

        private static string Diff(string expected, string actual)
        {
            var e = expected.Split('\n');
            var a = actual.Split('\n');
            return string.Join('\n', e.Except(a).Select(l => "- " + l).Concat(a.Except(e).Select(l => "+ " + l)));
        }
    }

    /// <summary>
    /// SPEC §3/§4 as plain data and the rules, with no locks and nothing shared with the core but
    /// the group membership of the starting topology (§2 formation is tested on its own) and the
    /// ids the core hands out. Operations return <c>ok</c>, the errno name, or <c>UNAUTHENTICATED</c>.
    /// </summary>
    private sealed class ReferenceModel
    {
        private const string Ok = "ok";
        private const string Unauthenticated = "UNAUTHENTICATED";
        private readonly SortedDictionary<uint, Group> _groups = [];
        private readonly SortedDictionary<PciAddress, Device> _devices = [];
        private readonly SortedDictionary<ulong, Container> _containers = [];
        private readonly SortedSet<ulong> _live = [];

        public ReferenceModel(TopologyDocument topology, TopologySnapshot initial)
        {
            foreach (var (id, info) in initial.Groups)
                _groups[id] = new Group(id);
            foreach (var f in topology.Functions)
            {
                var group = _groups[initial.Devices[f.Address].GroupId];
                _devices[f.Address] = new Device(f.Address, group) { Driver = f.Driver };
                group.Devices.Add(f.Address);
                // Boot binds are kernel binds: each DMA-API driver stacks one count.
                if (CoreState.UsesDmaApi(f.Driver))
                    group.Count++;
            }
            GroupIds = [.. _groups.Keys];
            DeviceAddresses = [.. _devices.Keys];
        }

        public List<uint> GroupIds { get; }
        public List<PciAddress> DeviceAddresses { get; }

        public List<ulong> ContainersOf(ulong session) => [.. _containers.Values.Where(c => c.Owner == session).Select(c => c.Id)];
        public List<uint> GroupsWithContainerSet() => [.. _groups.Values.Where(g => g.Set is not null).Select(g => g.Id)];
        public List<PciAddress> BoundDevices() => [.. _devices.Values.Where(d => d.BoundBy is not null).Select(d => d.Address)];

        public void OpenSession(ulong id) => _live.Add(id);

        // --- kernel side (§3 rows 1-4) ---

        public string BindDriver(PciAddress address, string driver)
        {
            var d = _devices[address];
            var g = d.Group;
            if (d.Driver is not null)
                return "EBUSY";
            if (CoreState.UsesDmaApi(driver))
            {
                if (g.Count > 0 && (g.Owner is not null || g.Domain != DomainKind.Default))
                    return "EBUSY";
                g.Count++;
            }
            d.Driver = driver;
            return Ok;
        }

        public string UnbindDriver(PciAddress address)
        {
            var d = _devices[address];
            var g = d.Group;
            if (d.Driver is null)
                return "EINVAL";
            if (d.BoundBy is not null)
                return "EBUSY";
            if (CoreState.UsesDmaApi(d.Driver))
            {
                if (g.Count == 0 || g.Owner is not null)
                    return "EINVAL";
                g.Count--;
            }
            d.Driver = null;
            return Ok;
        }

        // --- containers ---

        public string CreateContainer(ulong session, ulong id)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            _containers.Add(id, new Container(id, session));
            return Ok;
        }

        public string DestroyContainer(ulong session, ulong id)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            if (!TryOwnContainer(session, id, out var c))
                return "ENOENT";
            if (c.Groups.Count > 0 || c.Devices.Count > 0)
                return "EBUSY";
            _containers.Remove(id);
            return Ok;
        }

        // --- group flow (§4): a group claim, then the container's domain attached ---

        public string SetContainer(ulong session, uint groupId, ulong containerId)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            if (!_groups.TryGetValue(groupId, out var g) || !TryOwnContainer(session, containerId, out var c))
                return "ENOENT";
            if (g.Set is not null)
                return "EINVAL";
            if (g.Count > 0)
                return "EPERM";
            if (g.Domain != DomainKind.Default)
                return "EBUSY";
            g.Owner = session;
            g.Count = 1;
            g.Generation++;
            g.Domain = DomainKind.User;
            g.Attached = c.Id;
            g.Set = c.Id;
            c.Groups.Add(g.Id);
            return Ok;
        }

        public string UnsetContainer(ulong session, uint groupId)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            if (!_groups.TryGetValue(groupId, out var g))
                return "ENOENT";
            if (g.Set is not { } set || _containers[set].Owner != session)
                return "EINVAL";
            if (g.Devices.Any(a => _devices[a].BoundBy is not null))
                return "EBUSY";
            Unset(g);
            return Ok;
        }

        // --- device flow (§4): a device claim per device ---

        public string BindDevice(ulong session, PciAddress address, ulong containerId)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            if (!TryOwnContainer(session, containerId, out var c))
                return "ENOENT";
            var d = _devices[address];
            var g = d.Group;
            if (d.Driver != "vfio-pci")
                return "ENODEV";
            if (d.BoundBy == session)
                return "EINVAL";
            if (g.Count > 0 && g.Owner != session)
                return "EPERM";
            // vfio_device_block_group: a group held through the group path takes no device-path claim.
            if (g.Set is not null)
                return "EBUSY";
            if (g.Count == 0 && g.Domain != DomainKind.Default)
                return "EBUSY";
            if (g.Domain == DomainKind.User && g.Attached != c.Id)
                return "EBUSY";
            if (g.Count > 0)
            {
                g.Count++;
            }
            else
            {
                g.Owner = session;
                g.Count = 1;
                g.Generation++;
            }
            g.Domain = DomainKind.User;
            g.Attached = c.Id;
            c.Groups.Add(g.Id);
            d.BoundBy = session;
            d.Into = c.Id;
            c.Devices.Add(address);
            return Ok;
        }

        public string UnbindDevice(ulong session, PciAddress address)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            var d = _devices[address];
            if (d.BoundBy != session)
                return "EINVAL";
            Unbind(d);
            return Ok;
        }

        public string GetGroupStatus(ulong session, uint groupId)
        {
            if (!_live.Contains(session))
                return Unauthenticated;
            if (!_groups.TryGetValue(groupId, out var g))
                return "ENOENT";
            var mine = g.Set is { } set && _containers[set].Owner == session;
            return $"ok viable={g.Count == 0 || mine} set={mine}";
        }

        // --- sessions (§5): ending releases everything the session holds ---

        public string EndSession(ulong session)
        {
            if (!_live.Remove(session))
                return Ok;
            foreach (var c in _containers.Values.Where(c => c.Owner == session).ToList())
            {
                foreach (var address in c.Devices.ToList())
                    Unbind(_devices[address]);
                foreach (var g in _groups.Values.Where(g => g.Set == c.Id))
                    Unset(g);
                _containers.Remove(c.Id);
            }
            return Ok;
        }

        private void Unbind(Device d)
        {
            var g = d.Group;
            var c = _containers[d.Into!.Value];
            c.Devices.Remove(d.Address);
            d.BoundBy = null;
            d.Into = null;
            if (g.Count > 1)
            {
                g.Count--;
            }
            else
            {
                Release(g);
                c.Groups.Remove(g.Id);
            }
        }

        private void Unset(Group g)
        {
            _containers[g.Set!.Value].Groups.Remove(g.Id);
            g.Set = null;
            // Detach goes to BLOCKING while owned; the release right after takes it back to DEFAULT.
            g.Attached = null;
            g.Domain = DomainKind.Blocking;
            Release(g);
        }

        private static void Release(Group g)
        {
            g.Count = 0;
            g.Owner = null;
            g.Attached = null;
            g.Domain = DomainKind.Default;
        }

        private bool TryOwnContainer(ulong session, ulong id, out Container container) =>
            _containers.TryGetValue(id, out container!) && container.Owner == session;

        public string Render()
        {
            var sb = new StringBuilder(4096);
            foreach (var g in _groups.Values)
            {
                CoreState.GroupLine(sb, g.Id, g.Count, g.Owner, g.Domain, g.Generation, g.Attached, g.Set, g.Devices);
                foreach (var a in g.Devices)
                {
                    var d = _devices[a];
                    CoreState.DeviceLine(sb, a, g.Id, d.Driver, d.BoundBy, d.Into, 0);
                }
            }
            foreach (var c in _containers.Values)
                CoreState.ContainerLine(sb, c.Id, c.Owner, c.Groups, c.Devices);
            foreach (var s in _live)
                CoreState.SessionLine(sb, s);
            return sb.ToString();
        }

        private sealed class Group(uint id)
        {
            public uint Id { get; } = id;
            public SortedSet<PciAddress> Devices { get; } = [];
            public int Count { get; set; }
            public ulong? Owner { get; set; }
            public DomainKind Domain { get; set; } = DomainKind.Default;
            public ulong Generation { get; set; }
            public ulong? Attached { get; set; }
            public ulong? Set { get; set; }
        }

        private sealed class Device(PciAddress address, Group group)
        {
            public PciAddress Address { get; } = address;
            public Group Group { get; } = group;
            public string? Driver { get; set; }
            public ulong? BoundBy { get; set; }
            public ulong? Into { get; set; }
        }

        private sealed class Container(ulong id, ulong owner)
        {
            public ulong Id { get; } = id;
            public ulong Owner { get; } = owner;
            public SortedSet<uint> Groups { get; } = [];
            public SortedSet<PciAddress> Devices { get; } = [];
        }
    }
}
