using System.Buffers.Binary;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// Numbered DMA writes that leave their mark (the fencing tests, SPEC §16): write <c>n</c> (1, 2,
/// 3, …) puts the 8-byte number <c>n</c> into slot <c>n % slots</c> of a range, so the memory
/// itself shows which writes landed: a write that lands after a copy was taken changes the copy's
/// slot to a number never written before.
/// </summary>
public static class DmaStamps
{
    /// <summary>The bytes one stamp takes.</summary>
    public const int Size = sizeof(ulong);

    /// <summary>Where in the range write <paramref name="n"/> goes.</summary>
    public static ulong Offset(long n, int slots) => (ulong)(n % slots * Size);

    /// <summary>Write <paramref name="n"/>'s bytes.</summary>
    public static void Stamp(Span<byte> stamp, long n) => BinaryPrimitives.WriteInt64LittleEndian(stamp, n);

    /// <summary>The last write whose number <paramref name="memory"/> (a copy of the range) holds: the highest.</summary>
    public static long LastIn(ReadOnlySpan<byte> memory)
    {
        var last = 0L;
        for (var i = 0; i + Size <= memory.Length; i += Size)
            last = Math.Max(last, BinaryPrimitives.ReadInt64LittleEndian(memory[i..]));
        return last;
    }

    /// <summary>What a range of <paramref name="slots"/> holds after one writer's writes up to <paramref name="last"/> landed in order, and nothing after.</summary>
    public static byte[] Expected(long last, int slots)
    {
        var memory = new byte[slots * Size];
        for (var n = Math.Max(1, last - slots + 1); n <= last; n++)
            Stamp(memory.AsSpan((int)Offset(n, slots)), n);
        return memory;
    }
}
