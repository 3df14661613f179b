using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Random sequences of memory, mapping, device and DMA operations from several sessions against a
/// tiny reference model (per session: blocks with a shadow copy of their bytes, and a list of
/// mappings page → (block, permissions)). Checked after every step, for SPEC §10:
/// 3. a DMA succeeds exactly when the model's table of its own session allows every page, lands
///    exactly where the model says, and no byte of any session's memory differs from its shadow;
/// 4. once a session has ended none of its handles does anything and its memory never changes;
/// 5. whoever opens a device finds it reset (Bus Master off, registers zero).
/// Every result (errno, fault, data) must agree with the model. A failure prints the seed and the
/// trace; set <c>DMABROKER_DMA_MODEL_SEED=N</c> to replay one sequence.
/// </summary>
public sealed class DmaModelTests
{
    private const int Sequences = 2500;
    private const string SeedVariable = "DMABROKER_DMA_MODEL_SEED";
    private const ulong Page = IovaSpace.PageSize;
    private const int DmaLimit = 5;
    private const ulong MemoryLimit = 6 * Page;
    /// <summary>Fixed IOVAs are chosen among 12 pages from here, so mappings collide often.</summary>
    private const ulong IovaBase = 0x100000;
    private const int IovaPages = 12;
    private const int MaxLiveSessions = 3;

    /// <summary>Outcomes the generator must reach across the run, so the test cannot pass by exercising nothing.</summary>
    private static readonly string[] RequiredOutcomes =
    [
        "Allocate ok", "Allocate ENOMEM", "Allocate UNAUTHENTICATED", "Free ok", "Free EBUSY", "Free EINVAL",
        "MapDma ok", "MapDma ok auto", "MapDma EINVAL", "MapDma EEXIST", "MapDma ENOSPC", "MapDma EFAULT", "MapDma UNAUTHENTICATED",
        "UnmapDma ok", "UnmapDma ok 0", "UnmapDma ok all", "UnmapDma ENOENT", "UnmapDma EINVAL",
        "Claim ok", "Claim EPERM", "Claim EINVAL", "Release ok", "Release EBUSY", "Release EINVAL",
        "OpenDevice ok", "OpenDevice EPERM", "OpenDevice EINVAL", "OpenDevice EBUSY",
        "CloseDevice ok", "CloseDevice EBADF", "SetBusMaster ok", "Program ok",
        "DmaWrite ok", "DmaWrite fault Unmapped", "DmaWrite fault Permission", "DmaWrite fault BusMasterOff",
        "DmaWrite UNAUTHENTICATED", "DmaWrite EBADF",
        "DmaRead ok", "DmaRead fault Unmapped", "DmaRead fault Permission", "DmaRead UNAUTHENTICATED",
        "DmaCopy ok", "DmaCopy fault Unmapped", "DmaCopy fault Permission",
        "CpuWrite ok", "EndSession ok", "OpenSession ok",
    ];

    [Fact]
    public async Task RandomDmaSequences_AgainstReferenceModel_AgreeAndKeepInvariants3To5()
    {
        var topology = TopologyDocument.Default();
        var options = new BrokerOptions { Sessions = new SessionOptions { DmaLimit = DmaLimit, MemoryLimit = MemoryLimit } };
        await ModelHarness.RunAsync("DMA model-based sequence", SeedVariable, Sequences, RequiredOutcomes,
            run => new Sequence(run, run.Use(new Broker(topology, options, new FakeTimeProvider()))).RunAsync());
    }

    private enum OpKind
    {
        OpenSession,
        EndSession,
        Allocate,
        Free,
        CpuWrite,
        MapDma,
        UnmapDma,
        Claim,
        Release,
        OpenDevice,
        CloseDevice,
        SetBusMaster,
        Program,
        DmaWrite,
        DmaRead,
        DmaCopy,
    }

    private sealed class Sequence(ModelRun run, Broker broker)
    {
        private static readonly (OpKind Kind, int Weight)[] Weights =
        [
            (OpKind.OpenSession, 2), (OpKind.EndSession, 2), (OpKind.Allocate, 7), (OpKind.Free, 4), (OpKind.CpuWrite, 3),
            (OpKind.MapDma, 14), (OpKind.UnmapDma, 7), (OpKind.Claim, 7), (OpKind.Release, 3), (OpKind.OpenDevice, 7),
            (OpKind.CloseDevice, 3), (OpKind.SetBusMaster, 6), (OpKind.Program, 2), (OpKind.DmaWrite, 16), (OpKind.DmaRead, 8),
            (OpKind.DmaCopy, 5),
        ];

        private readonly Random _rng = run.Random;
        private readonly List<ModelSession> _sessions = [];
        private readonly ModelDevice[] _devices = [.. DmaRig.Edus.Select((a, i) => new ModelDevice(a, DmaRig.EduGroups[i]))];
        /// <summary>Every handle ever opened, open or not: stale ones must do nothing.</summary>
        private readonly List<ModelHandle> _handles = [];

        public async Task RunAsync()
        {
            await StepAsync(OpKind.OpenSession);
            await StepAsync(OpKind.OpenSession);
            var length = _rng.Next(30, 61);
            for (var i = 0; i < length; i++)
                await StepAsync(NextKind());
            foreach (var s in _sessions.Where(s => s.Live).ToList())
                await StepAsync(OpKind.EndSession, s);
            foreach (var d in _devices)
            {
                if (CoreState.Group(broker, d.Group).OwnerKind != OwnerKind.None)
                    Fail($"group {d.Group} is still owned after every session ended");
            }
            CheckAllMemory("at the end");
        }

        private OpKind NextKind() => run.Pick(Weights);

        /// <summary>An operation that has nothing to work on yet becomes the one that makes that thing.</summary>
        private OpKind Resolve(OpKind kind) => kind switch
        {
            OpKind.OpenSession when _sessions.Count(s => s.Live) >= MaxLiveSessions => OpKind.Allocate,
            OpKind.CpuWrite when !_sessions.Any(s => s.Live && s.Blocks.Any(b => !b.Freed)) => OpKind.Allocate,
            OpKind.CloseDevice or OpKind.SetBusMaster or OpKind.Program or OpKind.DmaWrite or OpKind.DmaRead or OpKind.DmaCopy
                when _handles.Count == 0 => OpKind.OpenDevice,
            OpKind.OpenDevice when !_devices.Any(d => d.Owner is { Live: true } && d.Open is null) && _rng.Next(4) > 0 => OpKind.Claim,
            _ => kind,
        };

        private async Task StepAsync(OpKind kind, ModelSession? endThis = null)
        {
            kind = Resolve(kind);
            await run.StepAsync(kind, () => RunAsync(kind, endThis), Category);
            CheckTables();
            if (kind is OpKind.DmaWrite or OpKind.DmaCopy or OpKind.CpuWrite or OpKind.EndSession)
                CheckAllMemory("after the last step");
        }

        /// <summary>"fault Unmapped 0x101000 Write" → "fault Unmapped"; "ok 0x2000" → "ok"; "ok 0" and "ok auto" stay.</summary>
        private static string Category(string actual)
        {
            if (actual.StartsWith("fault ", StringComparison.Ordinal))
                return string.Join(' ', actual.Split(' ').Take(2));
            return actual is "ok 0" or "ok auto" or "ok all" ? actual : actual.StartsWith("ok", StringComparison.Ordinal) ? "ok" : actual;
        }

        private async Task<(string, string, string)> RunAsync(OpKind kind, ModelSession? endThis)
        {
            switch (kind)
            {
                case OpKind.OpenSession:
                {
                    var session = broker.Sessions.Open();
                    var flavour = _rng.Next(2) == 0 ? ContainerType.Type1v2 : ContainerType.Iommufd;
                    var container = broker.Vfio.CreateContainer(session, flavour);
                    var s = new ModelSession(session, container);
                    _sessions.Add(s);
                    return ($"OpenSession() = s{session.Id} with {flavour} c{container.Id}", "ok", "ok");
                }
                case OpKind.EndSession:
                {
                    var s = endThis ?? PickSession();
                    await broker.Sessions.EndAsync(s.Session, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);
                    if (s.Live)
                    {
                        s.Live = false;
                        foreach (var h in _handles.Where(h => h.Session == s && h.Open))
                            CloseInModel(h);
                        foreach (var d in _devices.Where(d => d.Owner == s))
                            d.Owner = null;
                        s.Mappings.Clear();
                    }
                    return ($"EndSession(s{s.Id})", "ok", "ok");
                }
                case OpKind.Allocate:
                {
                    var s = PickSession();
                    var size = (ulong)_rng.Next(1, 3) * Page - (ulong)_rng.Next(2) * 100;
                    MemoryBlock? real = null;
                    var actual = Outcome(() => real = s.Session.Allocate(size));
                    var expected = !s.Live ? Unauthenticated : s.Used + RoundUp(size) > MemoryLimit ? "ENOMEM" : "ok";
                    if (actual == "ok" && expected == "ok")
                    {
                        var block = new ModelBlock(real!);
                        if (block.Vaddr == 0 || block.Vaddr % Page != 0 || block.Size != RoundUp(size)
                            || s.Blocks.Any(b => !b.Freed && b.Vaddr < block.Vaddr + block.Size && block.Vaddr < b.Vaddr + b.Size))
                            Fail($"Allocate({size}) gave [0x{block.Vaddr:x}, +0x{block.Size:x}), which is not a fresh page-aligned block");
                        s.Blocks.Add(block);
                    }
                    return ($"s{s.Id}.Allocate({size}) = 0x{real?.Vaddr ?? 0:x}", actual, expected);
                }
                case OpKind.Free:
                {
                    var s = PickSession(x => x.Blocks.Any(b => !b.Freed));
                    var vaddr = PickVaddr(s, aligned: _rng.Next(4) > 0);
                    var target = s.Blocks.FirstOrDefault(b => !b.Freed && b.Vaddr == vaddr);
                    var expected = !s.Live ? Unauthenticated : target is null ? "EINVAL" : s.Mappings.Any(m => m.Block == target) ? "EBUSY" : "ok";
                    var actual = Outcome(() => s.Session.Free(vaddr));
                    if (actual == "ok" && expected == "ok")
                        target!.Freed = true;
                    return ($"s{s.Id}.Free(0x{vaddr:x})", actual, expected);
                }
                case OpKind.CpuWrite:
                {
                    var writers = _sessions.Where(s => s.Live && s.Blocks.Any(b => !b.Freed)).ToList();
                    var s = writers[_rng.Next(writers.Count)];
                    var live = s.Blocks.Where(b => !b.Freed).ToList();
                    var block = live[_rng.Next(live.Count)];
                    var offset = _rng.Next((int)block.Size);
                    var data = RandomBytes(_rng.Next(1, (int)block.Size - offset + 1));
                    var actual = Outcome(() => s.Session.WriteMemory(block.Vaddr + (ulong)offset, data));
                    data.CopyTo(block.Shadow, offset);
                    return ($"s{s.Id}.WriteMemory(0x{block.Vaddr + (ulong)offset:x}, {data.Length} bytes)", actual, "ok");
                }
                case OpKind.MapDma:
                    return MapDma(PickSession(s => s.HasIommu(_devices) && s.Blocks.Any(b => !b.Freed)));
                case OpKind.UnmapDma:
                    return UnmapDma(PickSession(s => s.Mappings.Count > 0));
                case OpKind.Claim:
                {
                    var s = PickSession();
                    var free = _devices.Where(x => x.Owner is null).ToList();
                    var d = free.Count > 0 && _rng.Next(3) > 0 ? free[_rng.Next(free.Count)] : _devices[_rng.Next(_devices.Length)];
                    string expected;
                    if (!s.Live)
                        expected = Unauthenticated;
                    else if (s.Flavour == ContainerType.Type1v2)
                        expected = d.Owner is { Flavour: ContainerType.Type1v2 } ? "EINVAL" : d.Owner is not null ? "EPERM" : "ok";
                    else
                        expected = d.Owner == s ? "EINVAL" : d.Owner is not null ? "EPERM" : "ok";
                    var actual = Outcome(() =>
                    {
                        if (s.Flavour == ContainerType.Type1v2)
                            broker.Vfio.SetContainer(s.Session, d.Group, s.Container.Id);
                        else
                            broker.Vfio.BindDevice(s.Session, d.Address, s.Container.Id);
                    });
                    if (actual == "ok" && expected == "ok")
                        d.Owner = s;
                    return ($"s{s.Id}.Claim({d.Address} g{d.Group})", actual, expected);
                }
                case OpKind.Release:
                {
                    var s = PickSession();
                    var mine = _devices.Where(x => x.Owner == s).ToList();
                    var d = mine.Count > 0 && _rng.Next(4) > 0 ? mine[_rng.Next(mine.Count)] : _devices[_rng.Next(_devices.Length)];
                    var expected = !s.Live ? Unauthenticated : d.Owner != s ? "EINVAL" : d.Open is not null ? "EBUSY" : "ok";
                    var actual = Outcome(() =>
                    {
                        if (s.Flavour == ContainerType.Type1v2)
                            broker.Vfio.UnsetContainer(s.Session, d.Group);
                        else
                            broker.Vfio.UnbindDevice(s.Session, d.Address);
                    });
                    if (actual == "ok" && expected == "ok")
                    {
                        d.Owner = null;
                        // A TYPE1V2 container loses its IOMMU, and every mapping, with its last group.
                        if (s.Flavour == ContainerType.Type1v2 && !_devices.Any(x => x.Owner == s))
                            s.Mappings.Clear();
                    }
                    return ($"s{s.Id}.Release({d.Address} g{d.Group})", actual, expected);
                }
                case OpKind.OpenDevice:
                {
                    // Mostly a device its owner has not opened yet; else any session and any device.
                    var closed = _devices.Where(x => x.Owner is { Live: true } && x.Open is null).ToList();
                    var (s, d) = closed.Count > 0 && _rng.Next(4) > 0
                        ? closed[_rng.Next(closed.Count)] is var c ? (c.Owner!, c) : default
                        : (PickSession(), _devices[_rng.Next(_devices.Length)]);
                    var expected = !s.Live ? Unauthenticated : d.Owner is not null && d.Owner != s ? "EPERM" : d.Owner != s ? "EINVAL" : d.Open is not null ? "EBUSY" : "ok";
                    DeviceHandle? handle = null;
                    var actual = Outcome(() => handle = broker.Vfio.OpenDevice(s.Session, d.Address));
                    var then = "";
                    if (actual == "ok" && expected == "ok")
                    {
                        var h = new ModelHandle(handle!, s, d);
                        d.Open = h;
                        _handles.Add(h);
                        // Invariant 5: whoever opens it finds it reset.
                        var command = handle!.MmioRead(DeviceModel.ConfigIndex, 4, 2);
                        var factorial = handle.MmioRead(0, EduDevice.RegFactorial, 4);
                        var count = handle.MmioRead(0, EduDevice.RegDmaCount, 8);
                        if ((command & DeviceModel.CommandBusMaster) != 0 || factorial != 0 || count != 0)
                            Fail($"s{s.Id} opened {d.Address} and found it not reset: command 0x{command:x}, factorial {factorial}, DMA count {count}");
                        // Most drivers turn Bus Master on right away.
                        if (_rng.Next(4) > 0)
                        {
                            DmaRig.SetBusMaster(handle, on: true);
                            d.BusMaster = true;
                            then = ", then Bus Master on";
                        }
                    }
                    return ($"s{s.Id}.OpenDevice({d.Address}) = h{handle?.Id}{then}", actual, expected);
                }
                case OpKind.CloseDevice:
                {
                    var s = PickSession();
                    // Mostly one of its own handles; else anyone's, which this session cannot close.
                    var h = (_rng.Next(4) > 0 ? PickHandle(s) : null) ?? PickHandle(null)!;
                    var expected = !s.Live ? Unauthenticated : h.Open && h.Session == s ? "ok" : "EBADF";
                    var actual = Outcome(() => broker.Vfio.CloseDevice(s.Session, h.Handle.Id));
                    if (actual == "ok" && expected == "ok")
                        CloseInModel(h);
                    return ($"s{s.Id}.CloseDevice(h{h.Handle.Id})", actual, expected);
                }
                case OpKind.SetBusMaster:
                case OpKind.Program:
                {
                    var h = PickHandle(null)!;
                    var on = _rng.Next(4) > 0;
                    var n = (uint)_rng.Next(1, 10);
                    var expected = Refusal(h) ?? "ok";
                    var actual = Outcome(() =>
                    {
                        var result = kind == OpKind.SetBusMaster
                            ? h.Handle.MmioWrite(DeviceModel.ConfigIndex, 4, 2, DeviceModel.CommandMemory | (on ? DeviceModel.CommandBusMaster : 0u))
                            : h.Handle.MmioWrite(0, EduDevice.RegFactorial, 4, n);
                        if (!result.Ok)
                            Fail($"register write failed: {result}");
                    });
                    if (actual == "ok" && expected == "ok" && kind == OpKind.SetBusMaster)
                        h.Device.BusMaster = on;
                    return (kind == OpKind.SetBusMaster ? $"h{h.Handle.Id}.BusMaster({on})" : $"h{h.Handle.Id}.Factorial({n})", actual, expected);
                }
                case OpKind.DmaWrite:
                case OpKind.DmaRead:
                case OpKind.DmaCopy:
                    return Dma(kind);
                default:
                    throw new ArgumentOutOfRangeException(nameof(kind));
            }
        }

        private (string, string, string) MapDma(ModelSession s)
        {
            var (vaddr, size) = PickMapRange(s);
            if (_rng.Next(40) == 0)
                size = 0;
            var roll = _rng.Next(20);
            ulong? iova = roll == 0 ? null : roll == 1 ? IovaBase + 0x800 : IovaBase + (ulong)_rng.Next(IovaPages) * Page;
            if (s.Flavour == ContainerType.Iommufd && _rng.Next(6) == 0)
                iova = null;
            var (read, write) = _rng.Next(12) switch
            {
                0 => (false, false),
                < 4 => (true, false),
                < 6 => (false, true),
                _ => (true, true),
            };

            // The model, in Linux type1's order.
            var block = s.Blocks.FirstOrDefault(b => !b.Freed && vaddr >= b.Vaddr && vaddr < b.Vaddr + b.Size);
            string expected;
            if (!s.Live)
                expected = Unauthenticated;
            else if (!s.HasIommu(_devices) || (iova is null && s.Flavour == ContainerType.Type1v2))
                expected = "EINVAL";
            else if ((!read && !write) || size == 0 || ((iova ?? 0) | vaddr) % Page != 0)
                expected = "EINVAL";
            else if (iova is { } fixedIova && s.Mappings.Any(m => m.Iova < fixedIova + size && fixedIova < m.Iova + m.Size))
                expected = "EEXIST";
            else if (s.Mappings.Count >= DmaLimit)
                expected = "ENOSPC";
            else if (block is null || vaddr + size > block.Vaddr + block.Size)
                expected = "EFAULT";
            else
                expected = iova is null ? "ok auto" : "ok";

            ulong got = 0;
            var actual = Outcome(() => got = broker.Vfio.MapDma(s.Session, s.Container.Id, vaddr, iova, size, read, write));
            if (actual == "ok" && iova is null)
                actual = "ok auto";
            if (actual.StartsWith("ok", StringComparison.Ordinal) && actual == expected)
            {
                if (iova is null)
                {
                    // The broker's pick: aligned, never 0, free, usable.
                    if (got == 0 || got % Page != 0 || got + size - 1 > IovaSpace.ApertureLast
                        || (got <= IovaSpace.MsiLast && got + size - 1 >= IovaSpace.MsiFirst)
                        || s.Mappings.Any(m => m.Iova < got + size && got < m.Iova + m.Size))
                        Fail($"MapDma picked IOVA 0x{got:x} for 0x{size:x} bytes, which is not an aligned free usable range");
                }
                else if (got != iova)
                {
                    Fail($"MapDma at 0x{iova:x} returned 0x{got:x}");
                }
                s.Mappings.Add(new ModelMapping(got, size, vaddr, block!, read, write));
            }
            var at = iova is { } i ? $"0x{i:x}" : "auto";
            return ($"s{s.Id}.MapDma(0x{vaddr:x} @ {at}, 0x{size:x}, {(read ? "R" : "")}{(write ? "W" : "")}) = 0x{got:x}", actual, expected);
        }

        private (string, string, string) UnmapDma(ModelSession s)
        {
            var all = _rng.Next(15) == 0;
            ulong iova, size;
            if (s.Mappings.Count > 0 && _rng.Next(3) == 0)
            {
                // Exactly one existing mapping (reaches the auto-picked ones too).
                var m = s.Mappings[_rng.Next(s.Mappings.Count)];
                (iova, size) = (m.Iova, m.Size);
            }
            else
            {
                iova = IovaBase + (ulong)_rng.Next(IovaPages) * Page;
                size = (ulong)_rng.Next(1, 5) * Page;
                if (_rng.Next(30) == 0)
                    size = 0;
            }
            if (all)
                (iova, size) = (0, 0);

            string expected;
            List<ModelMapping> gone = [];
            if (!s.Live)
            {
                expected = Unauthenticated;
            }
            else if (!s.HasIommu(_devices))
            {
                expected = "EINVAL";
            }
            else if (all)
            {
                gone = [.. s.Mappings];
                expected = "ok all";
            }
            else if (size == 0)
            {
                expected = "EINVAL";
            }
            else
            {
                var touched = s.Mappings.Where(m => m.Iova < iova + size && iova < m.Iova + m.Size).ToList();
                var partial = touched.Any(m => m.Iova < iova || m.Iova + m.Size > iova + size);
                if (touched.Count == 0)
                    expected = s.Flavour == ContainerType.Iommufd ? "ENOENT" : "ok 0";
                else if (partial)
                    expected = s.Flavour == ContainerType.Iommufd ? "ENOENT" : "EINVAL";
                else
                    (expected, gone) = ($"ok 0x{touched.Sum(m => (long)m.Size):x}", touched);
            }

            ulong unmapped = 0;
            var actual = Outcome(() => unmapped = broker.Vfio.UnmapDma(s.Session, s.Container.Id, iova, size, all));
            if (actual == "ok")
                actual = all ? "ok all" : unmapped == 0 ? "ok 0" : $"ok 0x{unmapped:x}";
            if (actual == expected && all && unmapped != (ulong)gone.Sum(m => (long)m.Size))
                Fail($"unmap all returned 0x{unmapped:x} bytes, the model has 0x{gone.Sum(m => (long)m.Size):x} mapped");
            if (actual == expected)
            {
                foreach (var m in gone)
                    s.Mappings.Remove(m);
            }
            return ($"s{s.Id}.UnmapDma({(all ? "all" : $"0x{iova:x}, 0x{size:x}")})", actual, expected);
        }

        private (string, string, string) Dma(OpKind kind)
        {
            var h = PickHandle(null)!;
            var s = h.Session;
            var length = _rng.Next(8) == 0 ? (int)(2 * Page) + _rng.Next(100) : _rng.Next(1, 600);
            var iova = PickIova(s, length);
            var source = kind == OpKind.DmaCopy ? PickIova(s, length) : 0;
            var refusal = Refusal(h);
            string expected, actual, description;
            switch (kind)
            {
                case OpKind.DmaWrite:
                {
                    var data = RandomBytes(length);
                    description = $"h{h.Handle.Id}(s{s.Id}).DmaWrite(0x{iova:x}, {length})";
                    expected = refusal ?? Translate(h, iova, length, DmaAccess.Write) ?? "ok";
                    actual = Outcome(() => Text(h.Handle.DmaWrite(iova, data)));
                    if (actual == "ok" && expected == "ok")
                        Store(s, iova, data);
                    break;
                }
                case OpKind.DmaRead:
                {
                    var buffer = new byte[length];
                    description = $"h{h.Handle.Id}(s{s.Id}).DmaRead(0x{iova:x}, {length})";
                    expected = refusal ?? Translate(h, iova, length, DmaAccess.Read) ?? "ok";
                    actual = Outcome(() => Text(h.Handle.DmaRead(iova, buffer)));
                    if (actual == "ok" && expected == "ok" && !buffer.AsSpan().SequenceEqual(Load(s, iova, length)))
                        Fail($"DmaRead(0x{iova:x}, {length}) returned other bytes than the model's memory holds there");
                    break;
                }
                default:
                {
                    description = $"h{h.Handle.Id}(s{s.Id}).DmaCopy(0x{source:x} -> 0x{iova:x}, {length})";
                    expected = refusal
                        ?? (h.Device.BusMaster ? null : Text(DmaOutcome.Faulted(source & ~IovaSpace.PageMask, DmaAccess.Read, FaultReason.BusMasterOff)))
                        ?? Translate(h, source, length, DmaAccess.Read)
                        ?? Translate(h, iova, length, DmaAccess.Write)
                        ?? "ok";
                    actual = Outcome(() => Text(h.Handle.DmaCopy(source, iova, length)));
                    if (actual == "ok" && expected == "ok")
                        Store(s, iova, Load(s, source, length));
                    break;
                }
            }
            // Every fault is also posted on the session, and nothing else is.
            if (s.Live)
            {
                var events = DmaRig.Drain(s.Session);
                var wanted = actual.StartsWith("fault ", StringComparison.Ordinal) ? 1 : 0;
                if (events.Count != wanted || (wanted == 1 && events[0] is not FaultEvent))
                    Fail($"after {actual}, the session was told [{string.Join(", ", events)}]");
                if (wanted == 1 && events[0] is FaultEvent fault && Text(DmaOutcome.Faulted(fault.Iova, fault.Access, fault.Reason)) != actual)
                    Fail($"the fault event {fault} does not match the outcome {actual}");
            }
            return (description, actual, expected);
        }

        /// <summary>The model's answer for a device access through the handle's session's table: a fault text, or null if every page allows it.</summary>
        private static string? Translate(ModelHandle h, ulong iova, int length, DmaAccess access)
        {
            if (!h.Device.BusMaster)
                return Text(DmaOutcome.Faulted(iova & ~IovaSpace.PageMask, access, FaultReason.BusMasterOff));
            var last = iova + (ulong)length - 1;
            if (last < iova)
                return Text(DmaOutcome.Faulted(iova & ~IovaSpace.PageMask, access, FaultReason.Unmapped));
            for (var page = iova & ~IovaSpace.PageMask; page <= last; page += Page)
            {
                var m = h.Session.MappingAt(page);
                if (m is null)
                    return Text(DmaOutcome.Faulted(page, access, FaultReason.Unmapped));
                if (access == DmaAccess.Write ? !m.Write : !m.Read)
                    return Text(DmaOutcome.Faulted(page, access, FaultReason.Permission));
            }
            return null;
        }

        /// <summary>Why a handle may not be used at all: its session ended, or it was closed.</summary>
        private static string? Refusal(ModelHandle h) => !h.Session.Live ? Unauthenticated : !h.Open ? "EBADF" : null;

        private static void Store(ModelSession s, ulong iova, ReadOnlySpan<byte> data)
        {
            while (!data.IsEmpty)
            {
                var m = s.MappingAt(iova)!;
                var n = (int)Math.Min((ulong)data.Length, m.Iova + m.Size - iova);
                data[..n].CopyTo(m.Block.Shadow.AsSpan((int)(m.Vaddr - m.Block.Vaddr + (iova - m.Iova)), n));
                data = data[n..];
                iova += (ulong)n;
            }
        }

        private static byte[] Load(ModelSession s, ulong iova, int length)
        {
            var result = new byte[length];
            var done = 0;
            while (done < length)
            {
                var m = s.MappingAt(iova)!;
                var n = (int)Math.Min((ulong)(length - done), m.Iova + m.Size - iova);
                m.Block.Shadow.AsSpan((int)(m.Vaddr - m.Block.Vaddr + (iova - m.Iova)), n).CopyTo(result.AsSpan(done));
                done += n;
                iova += (ulong)n;
            }
            return result;
        }

        private static void CloseInModel(ModelHandle h)
        {
            h.Open = false;
            h.Device.Open = null;
            h.Device.BusMaster = false;
        }

        // ---- checks ----

        /// <summary>Each live session's mapping count and each block's pins agree with the model.</summary>
        private void CheckTables()
        {
            foreach (var s in _sessions.Where(s => s.Live))
            {
                if (s.Container.Iova.Count != s.Mappings.Count)
                    Fail($"s{s.Id}'s container holds {s.Container.Iova.Count} mappings, the model {s.Mappings.Count}");
                foreach (var b in s.Blocks.Where(b => !b.Freed))
                {
                    var pins = s.Mappings.Count(m => m.Block == b);
                    if (b.Real.Pins != pins)
                        Fail($"s{s.Id}'s block 0x{b.Vaddr:x} is pinned {b.Real.Pins} time(s), the model says {pins}");
                }
            }
        }

        /// <summary>
        /// Every byte of every block ever allocated, by every session, live or ended, freed or not,
        /// read behind the broker's back, equals the model's shadow: DMA reached only where it was
        /// allowed to, and nothing of an ended session changed.
        /// </summary>
        private void CheckAllMemory(string when)
        {
            foreach (var s in _sessions)
            {
                foreach (var b in s.Blocks)
                {
                    var real = b.Real.Bytes;
                    if (!real.AsSpan().SequenceEqual(b.Shadow))
                    {
                        var at = real.AsSpan().CommonPrefixLength(b.Shadow);
                        Fail($"{when}: s{s.Id}{(s.Live ? "" : " (ended)")}'s block 0x{b.Vaddr:x}{(b.Freed ? " (freed)" : "")} holds 0x{real[at]:x2} at +0x{at:x}, the model 0x{b.Shadow[at]:x2}");
                    }
                }
            }
        }

        // ---- picks ----

        /// <summary>Mostly a live session for which <paramref name="prefer"/> holds, if there is one; else as <see cref="PickSession()"/>.</summary>
        private ModelSession PickSession(Func<ModelSession, bool> prefer)
        {
            var preferred = _sessions.Where(s => s.Live && prefer(s)).ToList();
            return preferred.Count > 0 && _rng.Next(4) > 0 ? preferred[_rng.Next(preferred.Count)] : PickSession();
        }

        /// <summary>Mostly a live session; now and then an ended one.</summary>
        private ModelSession PickSession()
        {
            var live = _sessions.Where(s => s.Live).ToList();
            return live.Count > 0 && _rng.Next(12) > 0 ? live[_rng.Next(live.Count)] : _sessions[_rng.Next(_sessions.Count)];
        }

        /// <summary>Mostly an open handle; now and then a closed one or one of an ended session.</summary>
        private ModelHandle? PickHandle(ModelSession? of)
        {
            var candidates = _handles.Where(h => of is null || h.Session == of).ToList();
            if (candidates.Count == 0)
                return null;
            var open = candidates.Where(h => h.Open).ToList();
            return open.Count > 0 && _rng.Next(8) > 0 ? open[_rng.Next(open.Count)] : candidates[_rng.Next(candidates.Count)];
        }

        /// <summary>A block start (maybe freed) plus whole pages (maybe past its end), or now and then nothing allocated.</summary>
        private ulong PickVaddr(ModelSession s, bool aligned)
        {
            var offset = aligned ? 0ul : 8ul;
            if (s.Blocks.Count == 0 || _rng.Next(15) == 0)
                return SessionMemory.Base - Page + offset;
            var b = s.Blocks[_rng.Next(s.Blocks.Count)];
            return b.Vaddr + (ulong)_rng.Next((int)(b.Size / Page) + 1) * Page + offset;
        }

        /// <summary>
        /// Mostly whole pages inside one live block; now and then running past its end, unaligned, in a
        /// freed block, in a guard page or where nothing was ever allocated.
        /// </summary>
        private (ulong Vaddr, ulong Size) PickMapRange(ModelSession s)
        {
            var roll = _rng.Next(24);
            var live = s.Blocks.Where(b => !b.Freed).ToList();
            if (live.Count == 0 || roll == 0)
                return (PickVaddr(s, aligned: true), (ulong)_rng.Next(1, 3) * Page);
            var b = live[_rng.Next(live.Count)];
            var pages = (int)(b.Size / Page);
            var first = _rng.Next(pages);
            var count = _rng.Next(1, pages - first + 1) + (roll == 1 ? 1 : 0);
            return (b.Vaddr + (ulong)first * Page + (roll == 2 ? 8ul : 0), (ulong)count * Page);
        }

        /// <summary>Mostly in or around one of the session's mappings; else anywhere in the fixed window.</summary>
        private ulong PickIova(ModelSession s, int length)
        {
            if (s.Mappings.Count > 0 && _rng.Next(3) > 0)
            {
                var m = s.Mappings[_rng.Next(s.Mappings.Count)];
                var slack = (long)m.Size - length;
                return (ulong)Math.Max(0, (long)m.Iova + _rng.NextInt64(Math.Min(0, slack) - 64, Math.Max(0, slack) + 64));
            }
            return IovaBase + (ulong)_rng.NextInt64((long)(IovaPages * Page));
        }

        private byte[] RandomBytes(int length)
        {
            var data = new byte[length];
            _rng.NextBytes(data);
            return data;
        }

        private const string Unauthenticated = ModelRun.Unauthenticated;

        private static ulong RoundUp(ulong size) => (size + Page - 1) / Page * Page;

        private static string Text(DmaOutcome outcome) =>
            outcome.Ok ? "ok" : $"fault {outcome.Reason} 0x{outcome.FaultIova:x} {outcome.Access}";

        private static string Outcome(Action call) => ModelRun.Outcome(call);

        private static string Outcome(Func<string> call) => ModelRun.Outcome(call);

        private void Fail(string why) => run.Fail(why);
    }

    // ---- the reference model: plain data ----

    private sealed class ModelSession(Session session, Container container)
    {
        public Session Session { get; } = session;
        public Container Container { get; } = container;
        public ulong Id => Session.Id;
        public ContainerType Flavour => Container.Type;
        public bool Live { get; set; } = true;
        public List<ModelBlock> Blocks { get; } = [];
        public List<ModelMapping> Mappings { get; } = [];
        public ulong Used => Blocks.Where(b => !b.Freed).Aggregate(0ul, (sum, b) => sum + b.Size);

        /// <summary>A TYPE1V2 container has an IOMMU only while a group is set on it.</summary>
        public bool HasIommu(ModelDevice[] devices) => Flavour == ContainerType.Iommufd || devices.Any(d => d.Owner == this);

        public ModelMapping? MappingAt(ulong iova) => Mappings.FirstOrDefault(m => iova >= m.Iova && iova - m.Iova < m.Size);
    }

    private sealed class ModelBlock(MemoryBlock real)
    {
        public MemoryBlock Real { get; } = real;
        public ulong Vaddr => Real.Vaddr;
        public ulong Size => Real.Size;
        public byte[] Shadow { get; } = new byte[real.Size];
        public bool Freed { get; set; }
    }

    private sealed record ModelMapping(ulong Iova, ulong Size, ulong Vaddr, ModelBlock Block, bool Read, bool Write);

    private sealed class ModelDevice(PciAddress address, uint group)
    {
        public PciAddress Address { get; } = address;
        public uint Group { get; } = group;
        public ModelSession? Owner { get; set; }
        public ModelHandle? Open { get; set; }
        public bool BusMaster { get; set; }
    }

    private sealed class ModelHandle(DeviceHandle handle, ModelSession session, ModelDevice device)
    {
        public DeviceHandle Handle { get; } = handle;
        public ModelSession Session { get; } = session;
        public ModelDevice Device { get; } = device;
        public bool Open { get; set; } = true;
    }
}
