using System.Runtime.InteropServices;
using DmaBroker.Client;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// The two pages of NVMe's Doorbell Buffer Config (admin opcode 7Ch, NVMe 1.3), in shared memory:
/// the shadow doorbells, where the driver writes each queue's submission tail and completion head as
/// plain memory, and the EventIdx page, where the controller says up to where it has looked. The
/// driver rings a real (MMIO) doorbell only when it moves a value past the queue's EventIdx, as
/// Linux's <c>nvme_dbbuf_update_and_check_event</c> does; a controller that is still working reads the
/// shadow page itself. Each queue's dword sits at its doorbell's offset from 1000h (CAP.DSTRD 0).
/// </summary>
public sealed class NvmeShadowDoorbells
{
    private readonly DmaBuffer _doorbells;
    private readonly DmaBuffer _eventIndexes;

    internal NvmeShadowDoorbells(DmaBuffer doorbells, DmaBuffer eventIndexes)
    {
        if (!doorbells.IsShared || !eventIndexes.IsShared)
            throw new ArgumentException("shadow doorbells are shared memory: the driver and the controller both read and write them as memory");
        (_doorbells, _eventIndexes) = (doorbells, eventIndexes);
    }

    /// <summary>
    /// Publishes <paramref name="value"/> as a doorbell (<paramref name="slot"/>: 2 × qid for a
    /// submission tail, 2 × qid + 1 for a completion head) moved from <paramref name="old"/> in a ring
    /// of <paramref name="entries"/>, and says whether the MMIO doorbell must be rung as well: the
    /// store, a full barrier (the controller has the same between its EventIdx write and its shadow
    /// read, so one of the two sides sees the other), then the EventIdx check.
    /// </summary>
    public bool Update(int slot, int value, int old, int entries)
    {
        Volatile.Write(ref Dword(_doorbells, slot), value);
        Interlocked.MemoryBarrier();
        return NeedEvent(Volatile.Read(ref Dword(_eventIndexes, slot)), value, old, entries);
    }

    /// <summary>A queue's EventIdx as the controller last wrote it.</summary>
    public int EventIndex(int slot) => Volatile.Read(ref Dword(_eventIndexes, slot));

    /// <summary>
    /// Whether moving a doorbell from <paramref name="old"/> to <paramref name="value"/> passes
    /// <paramref name="eventIndex"/>, i.e. the event index lies in [old, value) going round the ring:
    /// Linux's <c>nvme_dbbuf_need_event</c>, in ring positions rather than 16-bit counters (so a wrap
    /// of the ring does not ring by itself).
    /// </summary>
    public static bool NeedEvent(int eventIndex, int value, int old, int entries) =>
        Modulo(value - eventIndex - 1, entries) < Modulo(value - old, entries);

    private static int Modulo(int value, int entries) => ((value % entries) + entries) % entries;

    private static ref int Dword(DmaBuffer page, int slot) => ref MemoryMarshal.Cast<byte, int>(page.Span)[slot];
}
