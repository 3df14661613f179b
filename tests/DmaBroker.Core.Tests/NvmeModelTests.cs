using System.Buffers.Binary;
using System.Globalization;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using Microsoft.Extensions.Time.Testing;
using Xunit.Abstractions;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Random command sequences against the NVMe model, driven through the core as a userspace driver
/// drives it, checked against a tiny reference: a FIFO per queue of what was rung and not yet
/// fetched, the completion queue's free slots, media as a dictionary of 512-byte blocks, and a
/// shadow copy of the driver's memory. The generator builds each command's PRPs itself, so it knows
/// which pages a transfer touches and which fault. Checked after every step: every completion is of
/// a command still outstanding (none completed twice), with the status, SQ id and SQ head the model
/// says; the session's events (faults, interrupts) are the model's; every byte of the driver's
/// memory outside the completion queues equals the shadow (so nothing lands anywhere else, and reads
/// land exactly); CSTS and the ignored-doorbell count agree. A reset (CC.EN 1 → 0, or FLR) drops what
/// was not fetched; no dropped command ever completes. At the end every command rung on a live queue
/// has completed exactly once. Valid and invalid commands alike: bad opcodes, namespaces, LBAs, sizes,
/// queue ids, misaligned and faulting PRPs (unmapped and read-only pages), invalid doorbells,
/// enable toggles while the completion queue is full, a submission queue that faults (CFS).
/// <c>DMABROKER_NVME_MODEL_SEED=N</c> replays one sequence; <c>DMABROKER_NVME_MODEL_SEQUENCES</c>
/// sets how many run (default 10,000).
/// </summary>
public sealed class NvmeModelTests(ITestOutputHelper output)
{
    private const string SeedVariable = "DMABROKER_NVME_MODEL_SEED";
    private const string CountVariable = "DMABROKER_NVME_MODEL_SEQUENCES";
    private const int DefaultSequences = 10_000;

    /// <summary>Every status the model can return must come up across the run, so the test cannot pass by exercising nothing.</summary>
    private static readonly NvmeStatus[] RequiredStatuses =
    [
        NvmeStatus.Success, NvmeStatus.InvalidOpcode, NvmeStatus.InvalidField, NvmeStatus.InvalidNamespace, NvmeStatus.LbaOutOfRange,
        NvmeStatus.DataTransferError, NvmeStatus.InvalidPrpOffset, NvmeStatus.InvalidQueueIdentifier, NvmeStatus.InvalidQueueDeletion,
    ];

    private static readonly string[] RequiredOutcomes =
    [
        "Submit ok", "Submit ignored", "Reap ok", "Admin Success", "Admin InvalidOpcode", "CreateQueues Success Success", "CreateQueues fatal", "DeleteQueues Success Success",
        "BadDoorbell ok", "Toggle ok", "Toggle dropped", "Flr ok",
    ];

    [Fact]
    public async Task RandomCommandSequences_AgainstReferenceModel_NoneLostOrDoubledAndDataRoundTrips()
    {
        var sequences = int.TryParse(Environment.GetEnvironmentVariable(CountVariable), CultureInfo.InvariantCulture, out var n) ? n : DefaultSequences;
        var topology = TopologyDocument.Default();
        var statuses = new HashSet<NvmeStatus>();
        var commands = 0L;
        var clock = System.Diagnostics.Stopwatch.StartNew();

        await ModelHarness.RunAsync("NVMe model-based sequence", SeedVariable, sequences, RequiredOutcomes, run =>
        {
            var broker = run.Use(new Broker(topology, null, new FakeTimeProvider()));
            var sequence = new Sequence(run, NvmeTestDriver.Create(Sequence.Pages, map: false, broker), statuses);
            sequence.Run();
            commands += sequence.Commands;
            return Task.CompletedTask;
        });

        output.WriteLine($"{sequences} sequences, {commands} commands in {clock.Elapsed.TotalSeconds:F1} s: {sequences / clock.Elapsed.TotalSeconds:F0} sequences/s");
        if (Environment.GetEnvironmentVariable(SeedVariable) is null)
            Assert.Empty(RequiredStatuses.Except(statuses));
    }

    private enum OpKind { Submit, Reap, Admin, CreateQueues, DeleteQueues, BadDoorbell, Toggle, Flr }

    private static readonly (OpKind Kind, int Weight)[] Weights =
    [
        (OpKind.Submit, 40), (OpKind.Reap, 18), (OpKind.Admin, 10), (OpKind.CreateQueues, 10), (OpKind.DeleteQueues, 4),
        (OpKind.BadDoorbell, 6), (OpKind.Toggle, 5), (OpKind.Flr, 1),
    ];

    /// <summary>
    /// A command as the generator built it. <c>Early</c> is the status the controller returns before it
    /// moves any data (Success if it gets that far); <c>Pieces</c> where the data goes, in order (PRP1's
    /// piece, then a page each); <c>ListFault</c> the unmapped page a PRP list pointer names, or 0.
    /// </summary>
    private sealed record Command(ushort Cid, byte Opcode, uint Nsid, ulong Lba, int Blocks, ulong Prp1, ulong Prp2, NvmeStatus Early,
        (ulong Iova, int Length)[] Pieces, ulong ListFault, uint Result = 0);

    private sealed class Sequence(ModelRun run, NvmeTestDriver d, HashSet<NvmeStatus> statuses)
    {
        // The driver's memory: pages 0/1 admin SQ/CQ, 2/3 I/O SQ/CQ, 4 PRP lists, 5 Identify's
        // target, 6-15 data, 16 read-only; 17-19 are never mapped. Under 85 KB, so it stays off the
        // large object heap: a run allocates thousands.
        public const int Pages = 20;
        private const int AdminSq = 0, AdminCq = 1, IoSq = 2, IoCq = 3, ListPage = 4, IdentifyPage = 5, FirstData = 6, DataPages = 10, ReadOnly = 16, FirstHole = 17;
        private const int AdminEntries = 8;
        private const ulong Blocks = (ulong)PciFunctionSpec.DefaultNamespaceMb << 11;
        private const ulong Page = NvmeTestDriver.Page;

        private readonly Random _rng = run.Random;
        private readonly byte[] _shadow = new byte[Pages * (int)Page];
        private readonly Dictionary<ulong, byte[]> _media = [];
        private readonly Dictionary<ushort, Command> _outstanding = [];
        private readonly HashSet<ushort> _dropped = [];
        private readonly Queue<Command> _pending = new(); // rung on the I/O queue, not yet fetched
        private readonly List<SessionEvent> _events = [];
        private NvmeQueue? _io;
        private ushort _vector;
        private int _fetched;
        private int _unreaped;
        private bool _fatal;
        private ulong _ignored;
        private ushort _nextCid = 1;
        private int _listSlot;

        public int Commands { get; private set; }

        private bool Ready => !_fatal;

        public void Run()
        {
            d.Map(0, ReadOnly);
            d.Map(ReadOnly, 1, read: true, write: false);
            Enable();
            var length = _rng.Next(8, 20);
            for (var i = 0; i < length; i++)
                Step(run.Pick(Weights));
            // Reap until nothing is left: every command rung on a live queue completes exactly once.
            for (var i = 0; _io is not null && Ready && (_pending.Count > 0 || _unreaped > 0); i++)
            {
                if (i == 100)
                    run.Fail("the queue never drained");
                Step(OpKind.Reap);
            }
            if (_outstanding.Count > 0)
                run.Fail($"commands never completed: {string.Join(", ", _outstanding.Keys)}");
        }

        private void Step(OpKind kind)
        {
            _ = run.StepAsync(kind, () => Task.FromResult(Execute(kind))).GetAwaiter().GetResult();
            var events = d.DrainEvents();
            if (!events.SequenceEqual(_events))
                run.Fail($"events: core [{string.Join(", ", events)}], model [{string.Join(", ", _events)}]");
            _events.Clear();
            CheckMemory();
            var csts = d.Csts & (NvmeController.CstsReady | NvmeController.CstsFatal);
            var expected = _fatal ? NvmeController.CstsReady | NvmeController.CstsFatal : NvmeController.CstsReady;
            if (csts != expected || d.Controller.IgnoredDoorbells != _ignored)
                run.Fail($"CSTS {csts:x} (model {expected:x}), ignored doorbells {d.Controller.IgnoredDoorbells} (model {_ignored})");
        }

        private (string, string, string) Execute(OpKind kind) => kind switch
        {
            // A dead controller ignores its admin doorbell too; only a reset brings it back.
            OpKind.Admin or OpKind.CreateQueues or OpKind.DeleteQueues when _fatal => AdminWhileFatal(),
            OpKind.Submit => Submit(),
            OpKind.Reap => Reap(),
            OpKind.Admin => Admin(),
            OpKind.CreateQueues => CreateQueues(),
            OpKind.DeleteQueues => DeleteQueues(),
            OpKind.BadDoorbell => BadDoorbell(),
            OpKind.Toggle => Toggle(),
            _ => Flr(),
        };

        // ---- steps ----

        private (string, string, string) Submit()
        {
            if (_io is null)
                return ("submit: no I/O queue", "ok", "ok");
            // The driver keeps one slot free: what was rung and not yet fetched, plus the new ones, fit.
            var room = _io.Size - 1 - _pending.Count;
            var count = Math.Min(room, _rng.Next(1, 6));
            var built = new List<Command>();
            for (var i = 0; i < count; i++)
            {
                var c = BuildIo();
                built.Add(c);
                WriteShadow(NvmeTestDriver.Iova(IoSq) + (ulong)(_io.SqTail * NvmeController.SqEntrySize), Entry(c));
                d.Submit(_io, Entry(c));
            }
            d.Ring(_io);
            Commands += count;
            if (!Ready)
            {
                _ignored++;
                return ($"submit {count} to a dead controller", "ignored", "ignored");
            }
            foreach (var c in built)
            {
                _outstanding[c.Cid] = c;
                _pending.Enqueue(c);
            }
            Process();
            return ($"submit {string.Join(" ", built.Select(Describe))}", "ok", "ok");
        }

        private (string, string, string) Reap()
        {
            if (_io is null)
                return ("reap: no I/O queue", "ok", "ok");
            var seen = Consume(_io);
            if (Ready && seen.Count != _unreaped)
                run.Fail($"{seen.Count} new completions, the model posted {_unreaped}");
            if (seen.Count > 0)
            {
                d.Write32(NvmeTestDriver.CqDoorbell(_io.Id), (uint)_io.CqHead);
                if (Ready)
                {
                    _unreaped = 0;
                    Process();
                }
                else
                {
                    _ignored++;
                }
            }
            return ($"reap {seen.Count}", "ok", "ok");
        }

        /// <summary>One admin command, run to completion at once (the admin queue never backs up here).</summary>
        /// <summary>An admin opcode the controller does not implement: 0Dh to 7Fh, except Doorbell Buffer Config (7Ch).</summary>
        private byte UnknownAdminOpcode()
        {
            var opcode = (byte)_rng.Next(0x0d, 0x7f);
            return opcode >= NvmeController.AdminDoorbellBufferConfig ? (byte)(opcode + 1) : opcode;
        }

        private (string, string, string) Admin()
        {
            var cid = NextCid();
            var roll = _rng.Next(6);
            var (entry, status, result) = roll switch
            {
                0 => (NvmeTestDriver.Command(NvmeController.AdminIdentify, cid, prp1: NvmeTestDriver.Iova(IdentifyPage), cdw10: NvmeController.CnsController), NvmeStatus.Success, 0u),
                1 => (NvmeTestDriver.Command(NvmeController.AdminIdentify, cid, nsid: 1, prp1: NvmeTestDriver.Iova(IdentifyPage), cdw10: NvmeController.CnsNamespace), NvmeStatus.Success, 0u),
                2 => (NvmeTestDriver.Command(NvmeController.AdminIdentify, cid, prp1: NvmeTestDriver.Iova(FirstHole + 1), cdw10: NvmeController.CnsController), NvmeStatus.DataTransferError, 0u),
                3 => (NvmeTestDriver.Command(NvmeController.AdminIdentify, cid, prp1: NvmeTestDriver.Iova(IdentifyPage), cdw10: (uint)_rng.Next(3, 256)), NvmeStatus.InvalidField, 0u),
                4 => (NvmeTestDriver.Command(NvmeController.AdminGetFeatures, cid, cdw10: NvmeController.FeatureNumberOfQueues), NvmeStatus.Success, NvmeController.QueuesAllocated),
                _ => (NvmeTestDriver.Command(UnknownAdminOpcode(), cid), NvmeStatus.InvalidOpcode, 0u),
            };
            if (status == NvmeStatus.DataTransferError)
                _events.Add(new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(FirstHole + 1), DmaAccess.Write, FaultReason.Unmapped));
            var actual = RunAdmin(entry, status, result);
            if (roll is 0 or 1 && actual == "Success")
            {
                // The shadow takes the Identify data, once its key field is right.
                var data = d.ReadHost(NvmeTestDriver.Iova(IdentifyPage), 4096);
                var ok = roll == 0 ? BinaryPrimitives.ReadUInt16LittleEndian(data) == 0x144d : BinaryPrimitives.ReadUInt64LittleEndian(data) == Blocks;
                if (!ok)
                    run.Fail("Identify data is wrong");
                WriteShadow(NvmeTestDriver.Iova(IdentifyPage), data);
            }
            return ($"admin {entry[0]:x2} cid {cid}", actual, status.ToString());
        }

        private (string, string, string) AdminWhileFatal()
        {
            var entry = NvmeTestDriver.Command(NvmeController.AdminGetFeatures, NextCid(), cdw10: NvmeController.FeatureNumberOfQueues);
            WriteShadow(NvmeTestDriver.Iova(AdminSq) + (ulong)(d.Admin.SqTail * NvmeController.SqEntrySize), entry);
            d.Submit(d.Admin, entry);
            d.Ring(d.Admin);
            _ignored++;
            return ("admin command to a dead controller", "ignored", "ignored");
        }

        private (string, string, string) CreateQueues()
        {
            if (_io is not null)
            {
                // Queue 1 exists: a second create of either is refused.
                var cid = NextCid();
                var sq = _rng.Next(2) == 0;
                var entry = NvmeTestDriver.Command(sq ? NvmeController.AdminCreateSq : NvmeController.AdminCreateCq, cid, prp1: NvmeTestDriver.Iova(FirstData),
                    cdw10: 1 | (3u << 16), cdw11: sq ? 1 | (1u << 16) : 3u);
                return ("create queue 1 again", RunAdmin(entry, NvmeStatus.InvalidQueueIdentifier, 0), nameof(NvmeStatus.InvalidQueueIdentifier));
            }
            var size = _rng.Next(2, 17);
            _vector = (ushort)_rng.Next(1, NvmeController.Vectors);
            // One in ten puts the submission queue where nothing is mapped: its first fetch is fatal (CFS).
            var broken = _rng.Next(10) == 0;
            var sqPage = broken ? FirstHole : IoSq;
            ClearQueuePage(IoCq);
            var cqStatus = RunAdmin(NvmeTestDriver.Command(NvmeController.AdminCreateCq, NextCid(), prp1: NvmeTestDriver.Iova(IoCq), cdw10: 1 | ((uint)(size - 1) << 16), cdw11: 3 | ((uint)_vector << 16)), NvmeStatus.Success, 0);
            var sqStatus = RunAdmin(NvmeTestDriver.Command(NvmeController.AdminCreateSq, NextCid(), prp1: NvmeTestDriver.Iova(sqPage), cdw10: 1 | ((uint)(size - 1) << 16), cdw11: 1 | (1u << 16)), NvmeStatus.Success, 0);
            _io = new NvmeQueue(1, IoSq, IoCq, size);
            _fetched = _unreaped = 0;
            if (!broken)
                return ($"create queue pair 1 of {size} on vector {_vector}", $"{cqStatus} {sqStatus}", "Success Success");
            // The driver rings one command; the fetch faults, the controller is dead.
            var c = BuildIo();
            WriteShadow(NvmeTestDriver.Iova(IoSq), Entry(c));
            d.Submit(_io, Entry(c));
            d.Ring(_io);
            Commands++;
            _dropped.Add(c.Cid);
            _fatal = true;
            _events.Add(new FaultEvent(NvmeTestDriver.Address, NvmeTestDriver.Iova(FirstHole), DmaAccess.Read, FaultReason.Unmapped));
            return ("create queue pair 1 on an unmapped page, ring", "fatal", "fatal");
        }

        private (string, string, string) DeleteQueues()
        {
            if (_io is null)
                return ("delete: no I/O queue", RunAdmin(NvmeTestDriver.Command(NvmeController.AdminDeleteSq, NextCid(), cdw10: 1), NvmeStatus.InvalidQueueIdentifier, 0), nameof(NvmeStatus.InvalidQueueIdentifier));
            Consume(_io);
            if (_rng.Next(3) == 0)
                RunAdmin(NvmeTestDriver.Command(NvmeController.AdminDeleteCq, NextCid(), cdw10: 1), NvmeStatus.InvalidQueueDeletion, 0);
            // What was rung and not fetched goes with the submission queue.
            var sq = RunAdmin(NvmeTestDriver.Command(NvmeController.AdminDeleteSq, NextCid(), cdw10: 1), NvmeStatus.Success, 0);
            var cq = RunAdmin(NvmeTestDriver.Command(NvmeController.AdminDeleteCq, NextCid(), cdw10: 1), NvmeStatus.Success, 0);
            DropPending();
            _io = null;
            return ("delete queue pair 1", $"{sq} {cq}", "Success Success");
        }

        private (string, string, string) BadDoorbell()
        {
            var size = _io?.Size ?? 2;
            var (offset, value) = _rng.Next(5) switch
            {
                0 => (NvmeTestDriver.SqDoorbell(1), (ulong)size + (ulong)_rng.Next(0, 100)),
                1 => (NvmeTestDriver.CqDoorbell(1), (ulong)size),
                2 => (NvmeTestDriver.SqDoorbell(_rng.Next(2, 65)), 1ul),
                3 => (NvmeTestDriver.CqDoorbell(_rng.Next(2, 65)), 0ul),
                _ => (NvmeController.RegDoorbells + (8ul * 65) + (4ul * (ulong)_rng.Next(0, 1000)), 1ul),
            };
            d.Write32(offset, (uint)value);
            _ignored++;
            return ($"doorbell 0x{offset:x} = {value}", "ok", "ok");
        }

        /// <summary>CC.EN 1 → 0 → 1, mid-I/O: whatever was rung and not fetched is dropped, and the driver starts over.</summary>
        private (string, string, string) Toggle()
        {
            if (_io is not null)
                Consume(_io);
            var dropped = _pending.Count;
            d.Write32(NvmeController.RegCc, 0);
            if (d.Csts != 0)
                run.Fail($"CSTS {d.Csts:x} after CC.EN 0");
            ForgetQueues();
            // Doorbells of the dropped queues are ignored now.
            d.Write32(NvmeTestDriver.SqDoorbell(0), 1);
            _ignored++;
            Enable();
            return ($"toggle CC.EN with {dropped} rung and not fetched", dropped > 0 ? "dropped" : "ok", dropped > 0 ? "dropped" : "ok");
        }

        private (string, string, string) Flr()
        {
            if (_io is not null)
                Consume(_io);
            d.Broker.Vfio.ResetDevice(d.Session, d.Handle.Id);
            var registers = $"{d.Read64(NvmeController.RegAsq):x} {d.Read32(NvmeController.RegAqa):x} {d.Read32(NvmeController.RegCc):x} {d.Csts:x}";
            ForgetQueues();
            DmaRig.SetBusMaster(d.Handle, on: true);
            Enable();
            return ("function-level reset", registers == "0 0 0 0" ? "ok" : registers, "ok");
        }

        // ---- the driver's side ----

        private void Enable()
        {
            ClearQueuePage(AdminCq);
            d.Enable(AdminEntries, AdminSq, AdminCq);
        }

        private void ForgetQueues()
        {
            DropPending();
            _io = null;
            _fatal = false;
        }

        private void DropPending()
        {
            foreach (var c in _pending)
            {
                _outstanding.Remove(c.Cid);
                _dropped.Add(c.Cid);
            }
            _pending.Clear();
            _fetched = _unreaped = 0;
        }

        /// <summary>The driver zeroes a completion queue before handing it to the controller, as drivers do.</summary>
        private void ClearQueuePage(int page)
        {
            var zeros = new byte[Page];
            d.WriteHost(NvmeTestDriver.Iova(page), zeros);
            WriteShadow(NvmeTestDriver.Iova(page), zeros);
        }

        /// <summary>Reads every new completion of the queue (no doorbell), checking each against the model.</summary>
        private List<NvmeCompletion> Consume(NvmeQueue queue)
        {
            var seen = new List<NvmeCompletion>();
            while (d.Poll(queue) is { } c)
            {
                seen.Add(c);
                if (_dropped.Contains(c.Cid) || !_outstanding.Remove(c.Cid, out var command))
                    run.Fail($"completion of cid {c.Cid}, which is not outstanding (dropped, completed twice or never submitted)");
                else
                {
                    var status = Status(command);
                    statuses.Add(c.Status);
                    if ((c.Status, c.SqId, c.Result) != (status, queue.Id, command.Result))
                        run.Fail($"cid {c.Cid}: {c.Status} sq {c.SqId} dw0 {c.Result:x}, model {status} sq {queue.Id} dw0 {command.Result:x}");
                }
            }
            // The completion queue's page is the controller's to write: the shadow takes it once its entries checked out.
            WriteShadow(NvmeTestDriver.Iova(queue.CqPage), d.ReadHost(NvmeTestDriver.Iova(queue.CqPage), (int)Page));
            return seen;
        }

        private string RunAdmin(byte[] entry, NvmeStatus expected, uint result)
        {
            var cid = BinaryPrimitives.ReadUInt16LittleEndian(entry.AsSpan(2));
            WriteShadow(NvmeTestDriver.Iova(AdminSq) + (ulong)(d.Admin.SqTail * NvmeController.SqEntrySize), entry);
            d.Submit(d.Admin, entry);
            d.Ring(d.Admin);
            _outstanding[cid] = new Command(cid, entry[0], 0, 0, 0, 0, 0, expected, [], 0, result);
            _events.Add(new InterruptEvent(d.Handle.Id, 0));
            var seen = Consume(d.Admin);
            d.Write32(NvmeTestDriver.CqDoorbell(0), (uint)d.Admin.CqHead);
            return seen.Count == 1 ? seen[0].Status.ToString() : $"{seen.Count} completions";
        }

        // ---- the model of the controller ----

        /// <summary>The controller fetches while the completion queue has room; each fetched command runs on the shadow and the media.</summary>
        private void Process()
        {
            var posted = false;
            while (_io is not null && _pending.Count > 0 && _unreaped < _io.Size - 1)
            {
                var c = _pending.Dequeue();
                _fetched++;
                _unreaped++;
                posted = true;
                Apply(c);
            }
            if (posted)
                _events.Add(new InterruptEvent(d.Handle.Id, _vector));
        }

        private void Apply(Command c)
        {
            if (c.Early != NvmeStatus.Success)
                return;
            if (c.ListFault != 0)
            {
                _events.Add(new FaultEvent(NvmeTestDriver.Address, c.ListFault, DmaAccess.Read, FaultReason.Unmapped));
                return;
            }
            var data = new byte[c.Blocks * 512];
            if (c.Opcode == NvmeController.IoRead)
            {
                for (var b = 0; b < c.Blocks; b++)
                {
                    if (_media.TryGetValue(c.Lba + (ulong)b, out var block))
                        block.CopyTo(data, b * 512);
                }
            }
            var at = 0;
            foreach (var (iova, length) in c.Pieces)
            {
                var page = Index(iova) / (int)Page;
                var write = c.Opcode == NvmeController.IoRead;
                if (page >= FirstHole || (write && page == ReadOnly))
                {
                    _events.Add(new FaultEvent(NvmeTestDriver.Address, iova & ~(Page - 1), write ? DmaAccess.Write : DmaAccess.Read, page >= FirstHole ? FaultReason.Unmapped : FaultReason.Permission));
                    return;
                }
                if (write)
                    data.AsSpan(at, length).CopyTo(_shadow.AsSpan(Index(iova)));
                else
                    _shadow.AsSpan(Index(iova), length).CopyTo(data.AsSpan(at));
                at += length;
            }
            if (c.Opcode == NvmeController.IoWrite)
            {
                for (var b = 0; b < c.Blocks; b++)
                    _media[c.Lba + (ulong)b] = data.AsSpan(b * 512, 512).ToArray();
            }
        }

        /// <summary>The status the model expects: the early one, else a Data Transfer Error if any page (or the list) faults.</summary>
        private static NvmeStatus Status(Command c)
        {
            if (c.Early != NvmeStatus.Success)
                return c.Early;
            if (c.ListFault != 0)
                return NvmeStatus.DataTransferError;
            foreach (var (iova, _) in c.Pieces)
            {
                var page = Index(iova) / (int)Page;
                if (page >= FirstHole || (c.Opcode == NvmeController.IoRead && page == ReadOnly))
                    return NvmeStatus.DataTransferError;
            }
            return NvmeStatus.Success;
        }

        // ---- the generator ----

        /// <summary>
        /// A random I/O command with PRPs the generator lays out itself (writing any list, and a write's
        /// data, to memory and shadow). Each defect is drawn on its own; the early status is the first
        /// in the order the controller checks: opcode, namespace, size (MDTS), LBA range, PRP1 alignment,
        /// PRP2 or the list pointer's alignment, the list's own fetch, the list entries' alignment.
        /// </summary>
        private Command BuildIo()
        {
            var cid = NextCid();
            var roll = _rng.Next(100);
            if (roll < 4)
                return new Command(cid, (byte)_rng.Next(0x03, 0x80), 1, 0, 0, 0, 0, NvmeStatus.InvalidOpcode, [], 0);
            if (roll < 10)
            {
                var good = _rng.Next(3) != 0;
                return new Command(cid, NvmeController.IoFlush, good ? 1 : (uint)_rng.Next(2, 1000), 0, 0, 0, 0, good ? NvmeStatus.Success : NvmeStatus.InvalidNamespace, [], 0);
            }
            var opcode = _rng.Next(2) == 0 ? NvmeController.IoRead : NvmeController.IoWrite;
            var nsidBad = _rng.Next(25) == 0;
            var tooBig = _rng.Next(30) == 0;
            var blocks = tooBig ? _rng.Next(257, 300) : _rng.Next(1, 25);
            var (lba, lbaBad) = _rng.Next(20) switch
            {
                0 => (Blocks - (ulong)_rng.Next(0, Math.Min(blocks, 24)), true),   // runs past the end
                1 => (ulong.MaxValue - (ulong)_rng.Next(0, 4), true),             // wraps 2^64
                2 => (Blocks - (ulong)blocks, tooBig),                            // ends exactly at the end
                _ => ((ulong)_rng.Next(0, 64), false),
            };
            var offset = _rng.Next(3) == 0 ? 0 : _rng.Next(0, 1024) * 4;
            var prp1Bad = _rng.Next(30) == 0;
            var length = Math.Min(blocks, 24) * 512;
            var pageCount = (offset + length + (int)Page - 1) / (int)Page;
            var pages = Enumerable.Range(0, pageCount).Select(_ => PickPage()).ToArray();
            var pieces = new List<(ulong, int)>();
            var left = length;
            for (var i = 0; i < pageCount; i++)
            {
                var start = i == 0 ? offset : 0;
                var piece = Math.Min(left, (int)Page - start);
                pieces.Add((NvmeTestDriver.Iova(pages[i], start), piece));
                left -= piece;
            }
            var prp1 = NvmeTestDriver.Iova(pages[0], offset) + (prp1Bad ? 1ul + (ulong)_rng.Next(3) : 0);
            var prp2 = (ulong)_rng.NextInt64();
            bool prp2Bad = false, listUnmapped = false, entryBad = false;
            if (pageCount == 2)
            {
                prp2Bad = _rng.Next(20) == 0;
                prp2 = NvmeTestDriver.Iova(pages[1]) + (prp2Bad ? 0x200ul : 0);
            }
            else if (pageCount > 2)
            {
                var entries = pages[1..].Select(p => NvmeTestDriver.Iova(p)).ToArray();
                entryBad = _rng.Next(20) == 0;
                if (entryBad)
                    entries[_rng.Next(entries.Length)] += 0x10;
                var slot = NvmeTestDriver.Iova(ListPage) + ((ulong)(_listSlot++ % 64) * 64);
                var list = new byte[entries.Length * 8];
                for (var i = 0; i < entries.Length; i++)
                    BinaryPrimitives.WriteUInt64LittleEndian(list.AsSpan(i * 8), entries[i]);
                d.WriteHost(slot, list);
                WriteShadow(slot, list);
                (prp2, prp2Bad, listUnmapped) = _rng.Next(20) switch
                {
                    0 => (slot + 4, true, false),
                    1 => (NvmeTestDriver.Iova(FirstHole + 2), false, true),
                    _ => (slot, false, false),
                };
            }
            var early = nsidBad ? NvmeStatus.InvalidNamespace
                : tooBig ? NvmeStatus.InvalidField
                : lbaBad ? NvmeStatus.LbaOutOfRange
                : prp1Bad || prp2Bad ? NvmeStatus.InvalidPrpOffset
                : !listUnmapped && entryBad ? NvmeStatus.InvalidPrpOffset
                : NvmeStatus.Success;
            var listFault = early == NvmeStatus.Success && listUnmapped ? prp2 : 0;
            if (opcode == NvmeController.IoWrite && early == NvmeStatus.Success)
            {
                foreach (var (iova, piece) in pieces)
                {
                    if (Index(iova) / (int)Page >= FirstHole)
                        continue;
                    var bytes = new byte[piece];
                    _rng.NextBytes(bytes);
                    d.WriteHost(iova, bytes);
                    WriteShadow(iova, bytes);
                }
            }
            return new Command(cid, opcode, nsidBad ? (uint)_rng.Next(2, 1000) : NvmeController.NamespaceId, lba, blocks, prp1, prp2, early, [.. pieces], listFault);
        }

        private int PickPage() => _rng.Next(25) switch
        {
            0 => FirstHole + _rng.Next(Pages - FirstHole),
            1 => ReadOnly,
            _ => FirstData + _rng.Next(DataPages),
        };

        private static byte[] Entry(Command c) => c.Opcode is NvmeController.IoRead or NvmeController.IoWrite
            ? NvmeTestDriver.ReadWrite(c.Opcode, c.Cid, c.Lba, c.Blocks, c.Prp1, c.Prp2, c.Nsid)
            : NvmeTestDriver.Command(c.Opcode, c.Cid, c.Nsid);

        private static string Describe(Command c) => $"{c.Cid}:{c.Opcode:x2}@{c.Lba}+{c.Blocks}";

        private ushort NextCid() => _nextCid++;

        private static int Index(ulong iova) => (int)(iova - NvmeTestDriver.IovaBase);

        private void WriteShadow(ulong iova, ReadOnlySpan<byte> data) => data.CopyTo(_shadow.AsSpan(Index(iova)));

        /// <summary>
        /// Every byte of the driver's memory equals the shadow, except the completion queues' pages,
        /// which only the controller writes: their entries are checked as the driver consumes them.
        /// </summary>
        private void CheckMemory()
        {
            var real = d.Block.Bytes.AsSpan();
            real.Slice(AdminCq * (int)Page, (int)Page).CopyTo(_shadow.AsSpan(AdminCq * (int)Page));
            real.Slice(IoCq * (int)Page, (int)Page).CopyTo(_shadow.AsSpan(IoCq * (int)Page));
            if (real.SequenceEqual(_shadow))
                return;
            var at = real.CommonPrefixLength(_shadow);
            run.Fail($"memory differs from the model at IOVA 0x{NvmeTestDriver.IovaBase + (ulong)at:x} (page {at / (int)Page}): core {real[at]:x2}, model {_shadow[at]:x2}");
        }
    }
}
