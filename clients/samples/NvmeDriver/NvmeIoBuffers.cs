using System.Buffers.Binary;
using DmaBroker.Client;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// Data buffers for I/O, one slot per command in flight, each with its own PRP list page. The slots
/// never move, so their PRP lists are written once; a command names its slot's pages through PRP1
/// and PRP2 as the specification asks: PRP2 is the second page for a two-page transfer and the PRP
/// list beyond that.
/// </summary>
public sealed class NvmeIoBuffers
{
    private const int PageSize = NvmeController.PageSize;

    private readonly (DmaBuffer Memory, ulong Iova) _data;
    private readonly (DmaBuffer Memory, ulong Iova) _lists;
    private readonly uint _nsid;

    internal NvmeIoBuffers((DmaBuffer, ulong) data, (DmaBuffer, ulong) lists, int slots, int stride, uint nsid)
    {
        (_data, _lists, _nsid) = (data, lists, nsid);
        (Slots, Stride) = (slots, stride);
    }

    public int Slots { get; }

    /// <summary>Bytes per slot, whole pages: the largest transfer a slot takes.</summary>
    public int Stride { get; }

    /// <summary>Slot i's PRP list: the IOVAs of its pages after the first.</summary>
    internal Task WritePrpListsAsync()
    {
        var lists = new byte[Slots * PageSize];
        for (var slot = 0; slot < Slots; slot++)
        {
            for (var page = 1; page < Stride / PageSize; page++)
                BinaryPrimitives.WriteUInt64LittleEndian(lists.AsSpan((slot * PageSize) + ((page - 1) * sizeof(ulong))), DataIova(slot) + (ulong)(page * PageSize));
        }
        return _lists.Memory.WriteAsync(0, lists);
    }

    /// <summary>A Read or Write of <paramref name="blocks"/> blocks of <paramref name="blockSize"/> at <paramref name="lba"/>, through slot <paramref name="slot"/>.</summary>
    public NvmeCommand Command(byte opcode, ushort slot, ulong lba, int blocks, int blockSize)
    {
        var length = blocks * blockSize;
        if (length > Stride)
            throw new ArgumentOutOfRangeException(nameof(blocks), blocks, $"a slot holds {Stride} bytes");
        var pages = (length + PageSize - 1) / PageSize;
        var prp2 = pages switch
        {
            1 => 0UL,
            2 => DataIova(slot) + PageSize,
            _ => _lists.Iova + (ulong)(slot * PageSize),
        };
        return NvmeCommand.ReadWrite(opcode, _nsid, lba, blocks, DataIova(slot), prp2);
    }

    /// <summary>
    /// Slot <paramref name="slot"/>'s first <paramref name="length"/> bytes as plain memory, when the
    /// buffers are shared (<see cref="DmaBuffer.IsShared"/>): what the CPU writes there a write
    /// command sends, and a read command's data appears there.
    /// </summary>
    public Memory<byte> Slot(ushort slot, int length) => _data.Memory.Memory.Slice(slot * Stride, length);

    /// <summary>Whether the slots are shared memory, so <see cref="Slot"/> is available.</summary>
    public bool IsShared => _data.Memory.IsShared;

    /// <summary>The CPU fills slot <paramref name="slot"/> (before a write).</summary>
    public Task WriteAsync(ushort slot, ReadOnlyMemory<byte> data) => _data.Memory.WriteAsync((ulong)(slot * Stride), data);

    /// <summary>The CPU reads slot <paramref name="slot"/> (after a read).</summary>
    public Task<byte[]> ReadAsync(ushort slot, int length) => _data.Memory.ReadAsync((ulong)(slot * Stride), length);

    private ulong DataIova(int slot) => _data.Iova + (ulong)(slot * Stride);
}
