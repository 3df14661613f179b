using System.Diagnostics;
using System.Runtime.InteropServices;
using DmaBroker.Client;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// A submission queue and its completion queue, both rings in session memory that the controller
/// reaches by DMA. The driver writes commands after the submission tail and rings the tail
/// doorbell; the controller fetches them, runs them and posts completions whose phase tag flips
/// each time the completion ring wraps; the driver consumes them from the completion head and
/// rings the head doorbell. A ring of N entries holds at most N - 1 commands at once.
/// With shadow doorbells (shared memory, <see cref="NvmeShadowDoorbells"/>) the tail and head are
/// written as memory and the MMIO doorbells rung only when the controller's EventIdx asks for one;
/// completions are then polled in the ring for a moment before the driver waits for the interrupt.
/// </summary>
public sealed class NvmeQueuePair
{
    private const uint Bar0 = 0;
    private const ulong Doorbells = 0x1000;

    /// <summary>
    /// How long a waiter trusts the interrupt: after that it reads the completion ring and CSTS
    /// itself, as Linux's nvme_timeout polls the queue before it gives up on a command, so a lost
    /// or late interrupt costs this much and a dead controller (CSTS.CFS) is seen in this time.
    /// </summary>
    public static readonly TimeSpan InterruptTimeout = TimeSpan.FromMilliseconds(500);

    /// <summary>How often a polled queue (the admin queue) checks CSTS for a fatal controller status while it waits.</summary>
    private static readonly TimeSpan StatusCheckInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>
    /// With shadow doorbells, how long a waiter watches the completion ring (spinning, yielding the
    /// core to the controller) before it waits for the interrupt: a few commands' worth, so a busy
    /// controller's completions are taken as they land and an idle one costs no core.
    /// </summary>
    public static readonly TimeSpan PollTime = TimeSpan.FromMicroseconds(100);

    private readonly VfioDevice _device;
    private readonly DmaChannel _dma;
    private readonly MsixVectors _vectors;
    private readonly DmaBuffer _sq;
    private readonly DmaBuffer _cq;
    private readonly NvmeShadowDoorbells? _shadow;
    // Doorbells sent and not yet answered, oldest first: the channel is ordered, so they end in this order.
    private readonly Queue<Task<DmaResult>> _doorbells = new();
    private int _sqTail;
    private int _cqHead;
    private bool _phase = true;

    internal NvmeQueuePair(ushort id, int entries, ushort? vector, VfioBinding vfio, DmaBuffer sq, DmaBuffer cq, NvmeShadowDoorbells? shadow = null)
    {
        (Id, Entries, Vector) = (id, entries, vector);
        (_device, _dma, _vectors) = (vfio.Device, vfio.Dma, vfio.Vectors);
        (_sq, _cq, _shadow) = (sq, cq, shadow);
    }

    /// <summary>Whether this queue's doorbells are shadowed in memory (<see cref="NvmeShadowDoorbells"/>).</summary>
    public bool ShadowDoorbells => _shadow is not null;

    /// <summary>MMIO doorbells rung so far (tail and head): with shadow doorbells, only those EventIdx asked for.</summary>
    public long DoorbellsRung { get; private set; }

    /// <summary>Completions taken by watching the ring (shadow doorbells), without waiting for an interrupt.</summary>
    public long CompletionsSpotted { get; private set; }

    /// <summary>The queue id: 0 for the admin pair, 1-64 for I/O.</summary>
    public ushort Id { get; }

    /// <summary>Entries in each ring.</summary>
    public int Entries { get; }

    /// <summary>The MSI-X vector the driver waits on for completions; null: the driver polls the completion ring instead.</summary>
    public ushort? Vector { get; }

    /// <summary>Commands submitted and not yet completed: at most <see cref="Capacity"/>.</summary>
    public int Outstanding { get; private set; }

    /// <summary>Commands that may be outstanding at once: one slot of the ring always stays empty.</summary>
    public int Capacity => Entries - 1;

    /// <summary>Interrupts that woke the driver on this queue so far.</summary>
    public long InterruptsTaken { get; private set; }

    /// <summary>Completions found by reading the ring after no interrupt came within <see cref="InterruptTimeout"/> (a lost or late interrupt).</summary>
    public long CompletionsPolled { get; private set; }

    /// <summary>
    /// Runs <paramref name="count"/> commands with up to <paramref name="queueDepth"/> in flight, each
    /// in a slot (0 to depth - 1, also its command id) that is free again once it completes:
    /// <paramref name="prepare"/> readies a slot and gives its command (those of one batch run
    /// concurrently, before the doorbell), <paramref name="completed"/> takes its successful completion.
    /// Stops submitting when <paramref name="stop"/> is cancelled, lets what is in flight complete
    /// (so it never waits on <paramref name="stop"/> itself), and returns how many commands completed.
    /// </summary>
    public async Task<long> RunAsync(long count, int queueDepth, Func<long, ushort, Task<NvmeCommand>> prepare,
        Func<long, ushort, Task> completed, TimeSpan timeout, CancellationToken stop = default)
    {
        if (queueDepth < 1 || queueDepth > Capacity - Outstanding)
            throw new ArgumentOutOfRangeException(nameof(queueDepth), queueDepth, $"queue {Id} has room for 1 to {Capacity - Outstanding} commands");
        var free = new Queue<ushort>(Enumerable.Range(0, queueDepth).Select(s => (ushort)s));
        var running = new (long Index, NvmeCommand Command)[queueDepth];
        long next = 0;
        long done = 0;
        var slots = new List<ushort>(queueDepth);
        var preparing = new List<Task<NvmeCommand>>(queueDepth);
        var finishing = new List<Task>(queueDepth);
        while (done < next || (next < count && !stop.IsCancellationRequested))
        {
            while (free.Count > 0 && next < count && !stop.IsCancellationRequested)
            {
                var slot = free.Dequeue();
                slots.Add(slot);
                running[slot].Index = next;
                preparing.Add(prepare(next++, slot));
            }
            if (slots.Count > 0)
            {
                var commands = await Task.WhenAll(preparing);
                for (var i = 0; i < commands.Length; i++)
                    running[slots[i]].Command = commands[i] = commands[i] with { Cid = slots[i] };
                slots.Clear();
                preparing.Clear();
                await SubmitAsync(commands);
            }
            foreach (var completion in await WaitAsync(timeout, CancellationToken.None))
            {
                var (index, command) = running[completion.Cid];
                completion.EnsureOk($"queue {Id}: command {index} (opcode 0x{command.Opcode:x2}, LBA {command.Cdw10 | ((ulong)command.Cdw11 << 32)})");
                finishing.Add(completed(index, completion.Cid));
                free.Enqueue(completion.Cid);
            }
            await Task.WhenAll(finishing);
            done += finishing.Count;
            finishing.Clear();
        }
        return done;
    }

    /// <summary>
    /// Writes <paramref name="commands"/> into the submission ring after its tail (one CPU write, two
    /// when the ring wraps) and rings the tail doorbell once; the controller runs them from there.
    /// </summary>
    public async Task SubmitAsync(IReadOnlyList<NvmeCommand> commands)
    {
        if (commands.Count > Capacity - Outstanding)
            throw new InvalidOperationException($"queue {Id}: {commands.Count} commands do not fit beside the {Outstanding} outstanding ({Capacity} at most)");
        if (commands.Count == 0)
            return;
        var entries = new byte[commands.Count * NvmeCommand.Size];
        for (var i = 0; i < commands.Count; i++)
            commands[i].WriteTo(entries.AsSpan(i * NvmeCommand.Size));
        var first = Math.Min(commands.Count, Entries - _sqTail) * NvmeCommand.Size;
        await _sq.WriteAsync((ulong)(_sqTail * NvmeCommand.Size), entries.AsMemory(0, first));
        if (first < entries.Length)
            await _sq.WriteAsync(0, entries.AsMemory(first));
        var old = _sqTail;
        _sqTail = (_sqTail + commands.Count) % Entries;
        Outstanding += commands.Count;
        if (_shadow is not null)
        {
            // The entries are in memory before the tail (a release store); a controller still at work
            // reads the tail itself, one that went idle set EventIdx so that this asks for the doorbell.
            if (_shadow.Update(2 * Id, _sqTail, old, Entries))
                Ring(Doorbells + (8UL * Id), _sqTail);
            ObserveDoorbells();
            return;
        }
        var doorbell = _dma.MmioWriteAsync(Bar0, Doorbells + (8UL * Id), (uint)_sqTail);
        DoorbellsRung++;
        await FlushDoorbellsAsync();
        (await doorbell).EnsureOk();
    }

    /// <summary>
    /// Waits until commands complete and returns them, in completion order: for the queue's
    /// interrupt and then the new entries, or (no vector) by reading the completion ring until its
    /// phase tags show new entries. An interrupt that does not come within <see cref="InterruptTimeout"/>
    /// is not waited for further: the ring is read anyway. Fails when the controller reports a
    /// fatal status (CSTS.CFS), which it checks whenever it has waited that long without news.
    /// </summary>
    public async Task<IReadOnlyList<NvmeCompletion>> WaitAsync(TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        if (Outstanding == 0)
            throw new InvalidOperationException($"queue {Id}: nothing outstanding to wait for");
        var deadline = DateTime.UtcNow + timeout;
        var nextStatusCheck = DateTime.UtcNow + StatusCheckInterval;
        while (true)
        {
            if (_shadow is not null && SpotCompletion())
            {
                var spotted = await ReapAsync();
                CompletionsSpotted += spotted.Count;
                if (spotted.Count > 0)
                    return spotted;
            }
            var interrupted = true;
            if (Vector is { } vector)
            {
                var slice = Remaining() < InterruptTimeout ? Remaining() : InterruptTimeout;
                try
                {
                    await _vectors.WaitAsync(vector, slice > TimeSpan.Zero ? slice : TimeSpan.Zero, cancellationToken);
                    InterruptsTaken++;
                }
                catch (TimeoutException)
                {
                    interrupted = false;
                }
            }
            var completed = await ReapAsync();
            if (completed.Count > 0)
            {
                if (!interrupted)
                    CompletionsPolled += completed.Count;
                return completed;
            }
            // An interrupt whose entries an earlier pass already took, or a poll too early: look again.
            if (!interrupted || DateTime.UtcNow >= nextStatusCheck)
            {
                nextStatusCheck = DateTime.UtcNow + StatusCheckInterval;
                await EnsureControllerAliveAsync();
            }
            if (Remaining() <= TimeSpan.Zero)
                throw new TimeoutException($"queue {Id}: {Outstanding} commands not completed within {timeout.TotalSeconds:F0} s");
        }

        TimeSpan Remaining() => deadline - DateTime.UtcNow;
    }

    /// <summary>
    /// A controller with CSTS.CFS set completes nothing more until it is reset (a command fetch or a
    /// completion post faulted): fail now, with the IOMMU fault that likely caused it, instead of at the timeout.
    /// </summary>
    private async Task EnsureControllerAliveAsync()
    {
        var csts = (uint)await _device.ReadRegisterAsync(Bar0, NvmeController.RegCsts);
        if ((csts & NvmeController.CstsFatal) == 0)
            return;
        var cause = _vectors.Faults.LastOrDefault() is { } fault
            ? $"; last IOMMU fault: {fault.Access} at IOVA 0x{fault.Iova:x}, {fault.Reason}"
            : "";
        throw new InvalidOperationException($"queue {Id}: controller fatal status (CSTS 0x{csts:x}) with {Outstanding} command{(Outstanding == 1 ? "" : "s")} outstanding{cause}");
    }

    /// <summary>
    /// Consumes the entries the controller posted since the last call (those whose phase tag is the
    /// current phase), then rings the head doorbell. Only as many ring slots as there are commands
    /// outstanding are read: no more can have been posted.
    /// </summary>
    public async Task<IReadOnlyList<NvmeCompletion>> ReapAsync()
    {
        if (Outstanding == 0)
            return [];
        var toEnd = Math.Min(Outstanding, Entries - _cqHead);
        // Shared memory: the ring itself, as a real driver reads it; otherwise a copy by Memory.Read.
        ReadOnlyMemory<byte> head = _cq.IsShared
            ? _cq.Memory.Slice(_cqHead * NvmeCompletion.Size, toEnd * NvmeCompletion.Size)
            : await _cq.ReadAsync((ulong)(_cqHead * NvmeCompletion.Size), toEnd * NvmeCompletion.Size);
        ReadOnlyMemory<byte> wrapped = Outstanding <= toEnd ? default
            : _cq.IsShared ? _cq.Memory[..((Outstanding - toEnd) * NvmeCompletion.Size)]
            : await _cq.ReadAsync(0, (Outstanding - toEnd) * NvmeCompletion.Size);
        var completed = new List<NvmeCompletion>(Outstanding);
        var oldHead = _cqHead;
        for (var i = 0; i < Outstanding; i++)
        {
            var entry = i < toEnd ? head.Span[(i * NvmeCompletion.Size)..] : wrapped.Span[((i - toEnd) * NvmeCompletion.Size)..];
            if (NvmeCompletion.Phase(entry) != _phase)
                break;
            // The phase tag is read before the rest of the entry (a read barrier, as SPDK's
            // spdk_rmb): in shared memory the controller may be posting while the driver looks.
            Interlocked.MemoryBarrier();
            completed.Add(NvmeCompletion.Parse(entry));
            if (++_cqHead == Entries)
            {
                _cqHead = 0;
                _phase = !_phase;
            }
        }
        if (completed.Count == 0)
            return completed;
        Outstanding -= completed.Count;
        if (_shadow is not null)
        {
            // The controller reads the head from memory when its ring looks full; it asks for the doorbell (EventIdx) only when it stopped on it.
            if (_shadow.Update((2 * Id) + 1, _cqHead, oldHead, Entries))
                Ring(Doorbells + (8UL * Id) + 4, _cqHead);
            ObserveDoorbells();
            return completed;
        }
        // Not awaited: the next doorbell on this ordered channel, or FlushDoorbellsAsync, checks it.
        await FlushDoorbellsAsync();
        Ring(Doorbells + (8UL * Id) + 4, _cqHead);
        return completed;
    }

    /// <summary>Waits for every doorbell sent to be taken; call before the queue is deleted.</summary>
    public async Task FlushDoorbellsAsync()
    {
        while (_doorbells.TryDequeue(out var pending))
            (await pending).EnsureOk();
    }

    /// <summary>Sends an MMIO doorbell without waiting for its answer (<see cref="ObserveDoorbells"/> or <see cref="FlushDoorbellsAsync"/> checks it).</summary>
    private void Ring(ulong offset, int value)
    {
        _doorbells.Enqueue(_dma.MmioWriteAsync(Bar0, offset, (uint)value));
        DoorbellsRung++;
    }

    /// <summary>Checks the doorbells already answered, so a failed one is reported at the next submission or reap.</summary>
    private void ObserveDoorbells()
    {
        while (_doorbells.TryPeek(out var pending) && pending.IsCompleted)
            _doorbells.Dequeue().GetAwaiter().GetResult().EnsureOk();
    }

    /// <summary>
    /// Watches the completion ring's next entry for up to <see cref="PollTime"/> (spinning, then
    /// yielding the core); true once its phase tag says the controller posted it.
    /// </summary>
    private bool SpotCompletion()
    {
        var spin = default(SpinWait);
        var start = Stopwatch.GetTimestamp();
        while (!Posted())
        {
            if (Stopwatch.GetElapsedTime(start) >= PollTime)
                return false;
            spin.SpinOnce(sleep1Threshold: -1);
        }
        return true;

        // Dword 3 of the entry at the head: its phase tag is bit 16.
        bool Posted() => ((Volatile.Read(ref MemoryMarshal.Cast<byte, int>(_cq.Span)[(_cqHead * NvmeCompletion.Size / sizeof(int)) + 3]) & 0x1_0000) != 0) == _phase;
    }
}
