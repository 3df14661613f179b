using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Google.Protobuf;

namespace DmaBroker.Client;

/// <summary>An IOMMU address space owned by the session: a VFIO type1v2 container or an iommufd IOAS.</summary>
public sealed class Container
{
    private readonly BrokerSession _session;

    internal Container(BrokerSession session, ulong id, ContainerType type)
    {
        _session = session;
        Id = id;
        Type = type;
    }

    /// <summary>The container id.</summary>
    public ulong Id { get; }

    /// <summary>TYPE1V2 or IOMMUFD: which Linux rules its mappings follow.</summary>
    public ContainerType Type { get; }

    /// <summary>VFIO_GROUP_SET_CONTAINER: claims the group for the session and attaches this address space.</summary>
    public async Task<IommuGroupClaim> SetGroupAsync(uint groupId, CancellationToken cancellationToken = default)
    {
        await _session.SetContainerAsync(groupId, Id, cancellationToken).ConfigureAwait(false);
        return new IommuGroupClaim(_session, groupId);
    }

    /// <summary>iommufd-style device bind: claims the device's group (counting claims) into this address space.</summary>
    public Task BindDeviceAsync(string address, CancellationToken cancellationToken = default) =>
        _session.BindDeviceAsync(address, Id, cancellationToken);

    /// <summary>VFIO_IOMMU_GET_INFO.</summary>
    public Task<IommuInfo> GetInfoAsync(CancellationToken cancellationToken = default) =>
        _session.CallAsync(v => v.GetIommuInfoAsync(new GetIommuInfoRequest { ContainerId = Id }, cancellationToken: cancellationToken));

    /// <summary>Maps a buffer (or part of it) for device access; with <paramref name="iova"/> null an IOMMUFD container picks the IOVA.</summary>
    public async Task<IovaMapping> MapAsync(DmaBuffer buffer, ulong? iova, bool read = true, bool write = true,
        ulong offset = 0, ulong? size = null, CancellationToken cancellationToken = default)
    {
        var request = new MapDmaRequest
        {
            ContainerId = Id,
            Vaddr = buffer.Vaddr + offset,
            Size = size ?? buffer.Size - offset,
            Read = read,
            Write = write,
        };
        if (iova is { } fixedIova)
            request.Iova = fixedIova;
        var response = await _session.CallAsync(v => v.MapDmaAsync(request, cancellationToken: cancellationToken)).ConfigureAwait(false);
        return new IovaMapping(this, response.Iova, request.Size);
    }

    /// <summary>Unmaps <c>[iova, iova+size)</c>; returns the bytes unmapped. No DMA touches the range afterwards.</summary>
    public async Task<ulong> UnmapAsync(ulong iova, ulong size, CancellationToken cancellationToken = default) =>
        (await _session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = Id, Iova = iova, Size = size }, cancellationToken: cancellationToken)).ConfigureAwait(false)).Unmapped;

    /// <summary>Unmaps everything.</summary>
    public async Task<ulong> UnmapAllAsync(CancellationToken cancellationToken = default) =>
        (await _session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = Id, All = true }, cancellationToken: cancellationToken)).ConfigureAwait(false)).Unmapped;
}

/// <summary>A group this session claimed with SetContainer; <see cref="ReleaseAsync"/> is VFIO_GROUP_UNSET_CONTAINER.</summary>
public sealed class IommuGroupClaim(BrokerSession session, uint groupId)
{
    /// <summary>The claimed group.</summary>
    public uint GroupId { get; } = groupId;

    /// <summary>VFIO_GROUP_GET_STATUS.</summary>
    public Task<GroupStatus> GetStatusAsync(CancellationToken cancellationToken = default) => session.GetGroupStatusAsync(GroupId, cancellationToken);

    /// <summary>Unsets the container: the group goes back to the kernel's default domain.</summary>
    public Task ReleaseAsync(CancellationToken cancellationToken = default) => session.UnsetContainerAsync(GroupId, cancellationToken);
}

/// <summary>An IOVA range mapped in a container.</summary>
public sealed record IovaMapping(Container Container, ulong Iova, ulong Size)
{
    /// <summary>Unmaps this range; no DMA touches it afterwards.</summary>
    public Task<ulong> UnmapAsync(CancellationToken cancellationToken = default) => Container.UnmapAsync(Iova, Size, cancellationToken);
}

/// <summary>
/// A block of session memory (the process's own memory), page-aligned. The same driver code
/// works on both kinds: <see cref="ReadAsync"/> and <see cref="WriteAsync"/> go through the
/// broker's Memory service for an ordinary buffer, and are plain copies for a shared one
/// (<see cref="IsShared"/>, SPEC §15), whose <see cref="Span"/> and <see cref="Memory"/> point
/// straight at the pages the device DMAs into.
/// </summary>
public sealed class DmaBuffer
{
    private readonly BrokerSession _session;
    private readonly SharedMapping? _mapping;

    internal DmaBuffer(BrokerSession session, ulong vaddr, ulong size, SharedMapping? mapping = null)
    {
        _session = session;
        Vaddr = vaddr;
        Size = size;
        _mapping = mapping;
    }

    /// <summary>The block's address in session memory.</summary>
    public ulong Vaddr { get; }

    /// <summary>The block's size, whole pages.</summary>
    public ulong Size { get; }

    /// <summary>
    /// Whether the buffer is shared memory mapped into this process (allocated with
    /// <c>shared: true</c> over a unix:// address); only then are <see cref="Span"/> and
    /// <see cref="Memory"/> available.
    /// </summary>
    public bool IsShared => _mapping is not null;

    /// <summary>
    /// The buffer's bytes, straight onto the shared mapping: what the CPU writes here the device
    /// reads, and the device's DMA writes appear here. InvalidOperationException for a buffer that
    /// is not shared; ObjectDisposedException once it was freed or its session disposed (a span
    /// taken earlier must not be used after that, as freed memory must not be).
    /// </summary>
    public Span<byte> Span => Mapping.GetSpan();

    /// <summary>The same bytes as <see cref="Span"/>, as <see cref="Memory{T}"/> for async code; the same rules apply.</summary>
    public Memory<byte> Memory => Mapping.Memory;

    private SharedMapping Mapping => _mapping ?? throw new InvalidOperationException(
        $"buffer 0x{Vaddr:x} is not shared memory: allocate it with shared: true over a unix:// address, or use ReadAsync/WriteAsync");

    /// <summary>The CPU reads the buffer: a copy out of the mapping when shared, a Memory.Read call otherwise.</summary>
    public async Task<byte[]> ReadAsync(ulong offset, int length, CancellationToken cancellationToken = default)
    {
        if (_mapping is not null)
            return SharedRange(offset, length).ToArray();
        var response = await BrokerException.Wrap(() => _session.Raw.Memory.ReadAsync(new ReadRequest { Vaddr = Vaddr + offset, Size = (uint)length }, cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false);
        return response.Data.ToByteArray();
    }

    /// <summary>The CPU writes the buffer: a copy into the mapping when shared, a Memory.Write call otherwise.</summary>
    public Task WriteAsync(ulong offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        if (_mapping is null)
            return BrokerException.Wrap(() => _session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = Vaddr + offset, Data = ByteString.CopyFrom(data.Span) }, cancellationToken: cancellationToken).ResponseAsync);
        data.Span.CopyTo(SharedRange(offset, data.Length));
        return Task.CompletedTask;
    }

    // The broker would answer EFAULT for a range outside the block; so does the local path.
    private Span<byte> SharedRange(ulong offset, int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        return offset > Size || (ulong)length > Size - offset
            ? throw new BrokerException(null, nameof(Errno.EFAULT), $"[0x{Vaddr + offset:x}, +0x{length:x}) is not inside buffer 0x{Vaddr:x} of 0x{Size:x} bytes")
            : Span.Slice((int)offset, length);
    }

    /// <summary>Frees the block (EBUSY while mapped); a shared buffer is unmapped from this process once the broker freed it.</summary>
    public async Task FreeAsync(CancellationToken cancellationToken = default)
    {
        await BrokerException.Wrap(() => _session.Raw.Memory.FreeAsync(new FreeRequest { Vaddr = Vaddr }, cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false);
        if (_mapping is not null)
        {
            _session.Forget(_mapping);
            ((IDisposable)_mapping).Dispose();
        }
    }
}

/// <summary>An open device (a VFIO device fd): registers, config space, reset, and DMA channels.</summary>
public sealed class VfioDevice : IAsyncDisposable
{
    /// <summary>VFIO region index of PCI config space (regions 0-5 are the BARs).</summary>
    public const uint ConfigRegion = WireConstants.ConfigRegion;

    private readonly BrokerSession _session;
    private int _closed;

    internal VfioDevice(BrokerSession session, string address, ulong handle)
    {
        _session = session;
        Address = address;
        Handle = handle;
    }

    /// <summary>The device's PCI address.</summary>
    public string Address { get; }

    /// <summary>The broker's handle for this open device.</summary>
    public ulong Handle { get; }

    /// <summary>Reads a register: BAR <paramref name="region"/> (0-5), or config space (7).</summary>
    public async Task<ulong> ReadRegisterAsync(uint region, ulong offset, int width = 4, CancellationToken cancellationToken = default)
    {
        var response = await _session.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = Handle, Index = region, Offset = offset, Size = (uint)width }, cancellationToken: cancellationToken)).ConfigureAwait(false);
        Span<byte> bytes = stackalloc byte[8];
        bytes.Clear();
        response.Data.Span.CopyTo(bytes);
        return BitConverter.ToUInt64(bytes);
    }

    /// <summary>Writes a register (little-endian <paramref name="width"/> bytes).</summary>
    public Task WriteRegisterAsync(uint region, ulong offset, ulong value, int width = 4, CancellationToken cancellationToken = default)
    {
        var bytes = BitConverter.GetBytes(value)[..width];
        return _session.CallAsync(v => v.RegionWriteAsync(new RegionWriteRequest { Handle = Handle, Index = region, Offset = offset, Data = ByteString.CopyFrom(bytes) }, cancellationToken: cancellationToken));
    }

    /// <summary>Sets Memory Space and Bus Master in the command register, so the device may DMA.</summary>
    public async Task EnableBusMasterAsync(CancellationToken cancellationToken = default)
    {
        var command = await ReadRegisterAsync(ConfigRegion, WireConstants.PciCommandRegister, 2, cancellationToken).ConfigureAwait(false);
        var enabled = command | WireConstants.PciCommandMemorySpace | WireConstants.PciCommandBusMaster;
        await WriteRegisterAsync(ConfigRegion, WireConstants.PciCommandRegister, enabled, 2, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>VFIO_DEVICE_RESET.</summary>
    public Task ResetAsync(CancellationToken cancellationToken = default) =>
        _session.CallAsync(v => v.ResetDeviceAsync(new ResetDeviceRequest { Handle = Handle }, cancellationToken: cancellationToken));

    /// <summary>Opens a DMA channel on this device: pipelined requests, small ones batched.</summary>
    public Task<DmaChannel> OpenDmaChannelAsync(DmaChannelOptions? options = null, CancellationToken cancellationToken = default) =>
        DmaChannel.OpenAsync(_session, Handle, options ?? new DmaChannelOptions(), cancellationToken);

    /// <summary>Closes the handle; the broker resets the device.</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0 || _session.Ended.IsCompleted)
            return;
        try
        {
            await _session.CallAsync(v => v.CloseDeviceAsync(new CloseDeviceRequest { Handle = Handle })).ConfigureAwait(false);
        }
        catch (BrokerException e) when (e.Errno is Errno.EBADF or Errno.EACCES || e is BrokerUnavailableException)
        {
            // Already closed with the session, or the broker is gone: nothing left to release.
        }
    }
}
