using System.Threading.Channels;
using DmaBroker.Core.Access;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;

namespace DmaBroker.Core.Sessions;

/// <summary>Why a session ended.</summary>
public enum SessionEndReason
{
    /// <summary>The client completed or cancelled its session stream.</summary>
    ClientClosed,
    /// <summary>The connection died (reset, keepalive timeout).</summary>
    ConnectionLost,
    /// <summary>The client sent nothing for the lease TTL.</summary>
    LeaseExpired,
    /// <summary>An admin revoked it.</summary>
    Revoked,
    /// <summary>The broker is stopping.</summary>
    Shutdown,
}

/// <summary>Something the broker tells a session on its stream.</summary>
public abstract record SessionEvent;

/// <summary>An IOMMU fault caused by one of the session's devices.</summary>
/// <param name="Address">The device whose DMA faulted.</param>
/// <param name="Iova">The page-aligned IOVA of the first page that failed.</param>
/// <param name="Access">The direction of the access.</param>
/// <param name="Reason">Why it faulted.</param>
public sealed record FaultEvent(PciAddress Address, ulong Iova, DmaAccess Access, FaultReason Reason) : SessionEvent;

/// <summary>An interrupt raised by one of the session's open devices.</summary>
/// <param name="Handle">The device handle it came through.</param>
/// <param name="Vector">The MSI vector.</param>
public sealed record InterruptEvent(ulong Handle, uint Vector) : SessionEvent;

/// <summary>A device the session had open or claimed was surprise-removed (fault injection, SPEC §14).</summary>
/// <param name="Address">The device that is gone.</param>
public sealed record DeviceRemovedEvent(PciAddress Address) : SessionEvent;

/// <summary>
/// A client's identity, as a <c>struct file *</c> is in Linux: everything it claims is released
/// when it ends. Every operation on its behalf runs inside <see cref="Enter"/>, so teardown can
/// wait for in-flight work before it releases anything.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "The ending token source has no timer; it lives exactly as long as the session and is never disposed early, so linked tokens never observe a disposed source.")]
public sealed class Session
{
    // The session state lock, lock 7 of docs/locking.md: a leaf, taken under a group's or container's lock.
    private readonly Lock _sync = new();
    private readonly CancellationTokenSource _ending = new();
    private readonly Channel<SessionEvent> _events;
    private readonly TimeProvider _time;
    private long _droppedEvents;
    private long _renewedAt;
    // A timestamp of the broker's clock from which the session's DMA is blocked (SPEC §16's fencing); none by default.
    private long _dmaFence = long.MaxValue;
    private int _streams;
    private TaskCompletionSource? _streamsClosed;

    internal Session(ulong id, string token, string clientName, DateTimeOffset openedAt, int eventBuffer, Grant grant, string peer, TimeProvider time)
    {
        _time = time;
        Memory = new SessionMemory(grant.Quotas.MemoryBytes, id);
        Grant = grant;
        Peer = peer;
        Id = id;
        Token = token;
        ClientName = clientName;
        OpenedAt = openedAt;
        _events = Channel.CreateBounded<SessionEvent>(new BoundedChannelOptions(eventBuffer)
        {
            SingleReader = true,
            FullMode = BoundedChannelFullMode.DropWrite,
        });
    }

    /// <summary>Public id, shown as a group's owner.</summary>
    public ulong Id { get; }

    /// <summary>The secret that authenticates calls; 256 random bits.</summary>
    public string Token { get; }

    /// <summary>The name the client gave in its hello (or <c>client-N</c>), for logs and admin views.</summary>
    public string ClientName { get; internal set; }

    /// <summary>When the session was opened, on the broker's clock.</summary>
    public DateTimeOffset OpenedAt { get; }

    /// <summary>
    /// What the principal that opened the session may do, as resolved then: its role, the groups
    /// it may claim and its quotas (SPEC §12). Its token is valid only for that same principal.
    /// </summary>
    public Grant Grant { get; }

    /// <summary>Who the session belongs to: <c>cert:&lt;CN&gt;</c>, <c>token:&lt;name&gt;</c>, <c>uid:&lt;n&gt;</c> or <c>anonymous</c>.</summary>
    public string Principal => Grant.Principal;

    /// <summary>The peer address of the connection that opened it, as gRPC names it.</summary>
    public string Peer { get; }

    /// <summary>The session's own memory (the process's address space).</summary>
    internal SessionMemory Memory { get; }

    internal RundownGate Gate { get; } = new();

    /// <summary>The session state lock (lock 7 of <c>docs/locking.md</c>); also guards the session's VFIO files.</summary>
    internal Lock Sync => _sync;

    internal ITimer? Lease { get; set; }

    /// <summary>When the lease was last renewed (or the session opened), as a timestamp of the registry's clock.</summary>
    internal long RenewedAt
    {
        get => Volatile.Read(ref _renewedAt);
        set => Volatile.Write(ref _renewedAt, value);
    }

    internal Task? Teardown { get; set; }

    /// <summary>Cancelled the moment the session starts to end.</summary>
    public CancellationToken Ending => _ending.Token;

    /// <summary>Set once the session starts to end.</summary>
    public SessionEndReason? EndReason { get; internal set; }

    /// <summary>When the session started to end, as a timestamp of the registry's clock (how long its release took is measured from it).</summary>
    internal long EndingSince { get; set; }

    /// <summary>
    /// The broker cut the session's connection (LINK_DOWN, SPEC §14): it ended as connection lost
    /// while its calls were still alive, so the host must abort them as a dead link would.
    /// </summary>
    public bool ConnectionCut { get; internal set; }

    /// <summary>Why the session ended, in words: what its stream's <c>revoked</c> and the watch's <c>session_ended</c> say.</summary>
    public string? EndMessage { get; internal set; }

    /// <summary>Faults and interrupts for the session stream; completes when the session ends.</summary>
    public ChannelReader<SessionEvent> Events => _events.Reader;

    /// <summary>Events dropped because the client read too slowly.</summary>
    public long DroppedEvents => Interlocked.Read(ref _droppedEvents);

    /// <summary>
    /// Marks one operation on the session's behalf; dispose it when done. A session that has
    /// started to end admits none (UNAUTHENTICATED).
    /// </summary>
    internal OperationScope Enter() =>
        Gate.TryEnter() ? new OperationScope(this) : throw ErrnoException.Unauthenticated($"session {Id} has ended");

    /// <summary>
    /// Blocks every DMA of the session's devices from <paramref name="timestamp"/> on (a timestamp
    /// of the broker's clock, <see cref="TimeProvider.GetTimestamp"/>): each access checks it just
    /// before it translates, and faults BLOCKED past it. A cluster store (SPEC §16) moves it with
    /// each renewal of the session's lease, to before the lease can expire, so that no DMA is
    /// applied once another replica may own the session's groups, even if the session has not been
    /// ended yet: a replica thawed after SIGSTOP may take up the DMA queued to it before its fencing
    /// timer runs.
    /// </summary>
    public void FenceDmaAt(long timestamp) => Volatile.Write(ref _dmaFence, timestamp);

    /// <summary>Whether the session's DMA is fenced now (<see cref="FenceDmaAt"/>); a single process never sets a fence, and pays one read.</summary>
    internal bool DmaFenced => Volatile.Read(ref _dmaFence) is var fence && fence != long.MaxValue && _time.GetTimestamp() >= fence;

    /// <summary>Names the client (from its hello) in logs and admin views.</summary>
    public void Rename(string clientName)
    {
        if (!string.IsNullOrWhiteSpace(clientName))
            ClientName = clientName.Length > 128 ? clientName[..128] : clientName;
    }

    /// <summary>DMA streams open on this session's devices.</summary>
    public int StreamCount => Volatile.Read(ref _streams);

    /// <summary>Counts a DMA stream of this session until disposed; teardown waits for them to close.</summary>
    public StreamScope TrackStream()
    {
        lock (_sync)
        {
            if (_streams >= Grant.Quotas.DmaStreams)
                throw ErrnoException.Exhausted(Errno.ENOSPC, $"session {Id} has {_streams} DMA stream(s) open, its principal's quota");
            _streams++;
        }
        return new StreamScope(this);
    }

    private void StreamClosed()
    {
        lock (_sync)
        {
            if (--_streams == 0)
                _streamsClosed?.TrySetResult();
        }
    }

    /// <summary>Completes when no DMA stream of the session is open any more.</summary>
    internal Task WhenStreamsClosed()
    {
        lock (_sync)
        {
            if (_streams == 0)
                return Task.CompletedTask;
            _streamsClosed ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _streamsClosed.Task;
        }
    }

    internal void Post(SessionEvent ev)
    {
        if (!_events.Writer.TryWrite(ev))
            Interlocked.Increment(ref _droppedEvents);
    }

    internal void SignalEnding()
    {
        _ending.Cancel();
    }

    internal void CompleteEvents() => _events.Writer.TryComplete();

    /// <summary>
    /// Memory.Allocate: zeroed, page-aligned memory of the session. With
    /// <paramref name="shareWithUid"/>, shared memory (SPEC §15): the block lives in the session's
    /// file under /dev/shm, owned by that uid, which the client maps (<see cref="MemoryBlock.ShmPath"/>).
    /// </summary>
    public MemoryBlock Allocate(ulong size, uint? shareWithUid = null)
    {
        using var op = Enter();
        return Memory.Allocate(size, shareWithUid);
    }

    /// <summary>Memory.Free: EBUSY while mapped.</summary>
    public void Free(ulong vaddr)
    {
        using var op = Enter();
        Memory.Free(vaddr);
    }

    /// <summary>Memory.Read: the CPU's view.</summary>
    public void ReadMemory(ulong vaddr, Span<byte> destination)
    {
        using var op = Enter();
        CheckRead((ulong)destination.Length);
        Memory.Read(vaddr, destination);
    }

    /// <summary>
    /// Memory.Read into a new buffer of <paramref name="size"/> bytes. The size is checked
    /// (EINVAL beyond <see cref="SessionMemory.MaxTransfer"/>) before anything is allocated, so a
    /// caller can pass a size straight from the wire.
    /// </summary>
    public byte[] ReadMemory(ulong vaddr, ulong size)
    {
        CheckRead(size);
        var data = new byte[size];
        ReadMemory(vaddr, data);
        return data;
    }

    private static void CheckRead(ulong size)
    {
        if (size > SessionMemory.MaxTransfer)
            throw ErrnoException.Invalid($"at most {SessionMemory.MaxTransfer} bytes per read, not {size}");
    }

    /// <summary>Memory.Write: the CPU's view.</summary>
    public void WriteMemory(ulong vaddr, ReadOnlySpan<byte> source)
    {
        using var op = Enter();
        if (source.Length > SessionMemory.MaxTransfer)
            throw ErrnoException.Invalid($"at most {SessionMemory.MaxTransfer} bytes per write, not {source.Length}");
        Memory.Write(vaddr, source);
    }

    /// <summary>The session as logs name it: its id and client name.</summary>
    public override string ToString() => $"session {Id} ({ClientName})";

    /// <summary>One DMA stream of a session, counted until disposed.</summary>
    public readonly struct StreamScope(Session session) : IDisposable
    {
        /// <summary>The stream is closed: teardown no longer waits for it.</summary>
        public void Dispose() => session.StreamClosed();
    }

    /// <summary>One operation in flight on a session's behalf.</summary>
    internal readonly struct OperationScope(Session session) : IDisposable
    {
        public void Dispose() => session.Gate.Exit();
    }
}
