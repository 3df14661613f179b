using System.Buffers.Binary;
using System.IO.MemoryMappedFiles;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §15's shared session memory in the core: blocks backed by a file under /dev/shm that a
/// client maps, with the same limit, guard, pin and teardown rules as the broker's own memory.
/// </summary>
[Collection(RealThreadsCollection.Name)] // one test races a busy DMA writer against teardown
public sealed class SharedMemoryTests
{
    private const ulong Page = SessionMemory.PageSize;
    private const ulong Iova = 0x10_0000;

    [Fact]
    public async Task Allocate_Shared_CreatesAFileUnderDevShmWithMode0600OwnedByThePeer()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0);

        var block = rig.Session.Allocate(3 * Page + 1, Shm.Uid);

        Assert.NotNull(block.ShmPath);
        Assert.StartsWith("/dev/shm/dmabroker-", block.ShmPath, StringComparison.Ordinal);
        Assert.Contains($"-s{rig.Session.Id}-", block.ShmPath, StringComparison.Ordinal);
        Assert.Equal(0ul, block.ShmOffset % Page);
        Assert.Equal(4 * Page, block.Size);
        Assert.Equal(4 * Page, rig.Session.Memory.Used);
        Assert.Equal(("regular file", Shm.Uid, "600"), Shm.Stat(block.ShmPath));
        var contents = new byte[block.Size];
        rig.Session.ReadMemory(block.Vaddr, contents);
        Assert.All(contents, b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task Allocate_SharedWithAnotherUid_FileIsOwnedByThatUid()
    {
        // As root (the broker here), chown gives the file away; as another user it fails EPERM and leaves no file.
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0);
        const uint other = 4242;

        if (Shm.Uid == 0)
        {
            var block = rig.Session.Allocate(Page, other);
            Assert.Equal(("regular file", other, "600"), Shm.Stat(block.ShmPath!));
        }
        else
        {
            var e = Assert.Throws<ErrnoException>(() => rig.Session.Allocate(Page, other));
            Assert.Equal(Errno.EPERM, e.Errno);
            Assert.Null(rig.Session.Memory.SharedPath);
            Assert.Equal(0ul, rig.Session.Memory.Used);
        }
    }

    [Fact]
    public async Task SharedBlocks_SecondSessionAndSecondBlock_NeverShareAFileAcrossSessionsButShareOneWithin()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0);
        var other = rig.Broker.Sessions.Open("other");

        var a = rig.Session.Allocate(Page, Shm.Uid);
        var b = rig.Session.Allocate(2 * Page, Shm.Uid);
        var c = other.Allocate(Page, Shm.Uid);

        Assert.Equal(a.ShmPath, b.ShmPath);
        Assert.NotEqual(a.ShmPath, c.ShmPath);
        Assert.True(b.ShmOffset >= a.ShmOffset + a.Size || a.ShmOffset >= b.ShmOffset + b.Size, "two blocks overlap in the file");
        Assert.True(b.Vaddr >= a.End + Page, "shared blocks keep the guard page between them");
    }

    [Fact]
    public async Task SharedBlock_DeviceDmaAndClientCpu_MeetInTheSamePages()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = rig.Session.Allocate(4 * Page, Shm.Uid);
        rig.Map(block.Vaddr, Iova, block.Size);
        var device = rig.Open();
        using var client = Shm.MapAsClient(block);

        // The device writes: the client's CPU sees it in its own mapping, and so does Memory.Read.
        Assert.True(device.DmaWrite(Iova + Page + 8, "from the device"u8).Ok);
        Assert.Equal("from the device"u8.ToArray(), client.Span.Slice((int)Page + 8, 15).ToArray());
        var read = new byte[15];
        rig.Session.ReadMemory(block.Vaddr + Page + 8, read);
        Assert.Equal("from the device"u8.ToArray(), read);

        // The client's CPU writes: the device reads exactly that.
        "from the CPU"u8.CopyTo(client.Span[(3 * (int)Page)..]);
        var fetched = new byte[12];
        Assert.True(device.DmaRead(Iova + 3 * Page, fetched).Ok);
        Assert.Equal("from the CPU"u8.ToArray(), fetched);

        // IOMMU rules still bind the device: past the mapping it faults and writes nothing.
        Assert.False(device.DmaWrite(Iova + 4 * Page, "x"u8).Ok);
    }

    [Fact]
    public async Task Free_SharedBlock_ReleasesItsPagesAndALaterBlockIsZeroed()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0);
        var block = rig.Session.Allocate(16 * Page, Shm.Uid);
        var path = block.ShmPath!;
        var pattern = new byte[16 * Page];
        Array.Fill(pattern, (byte)0xab);
        rig.Session.WriteMemory(block.Vaddr, pattern);
        Assert.True(Shm.AllocatedBytes(path) >= 16 * Page);

        rig.Session.Free(block.Vaddr);

        Assert.Equal(0ul, Shm.AllocatedBytes(path));
        Assert.Equal(0ul, rig.Session.Memory.Used);
        var again = rig.Session.Allocate(16 * Page, Shm.Uid);
        Assert.Equal(block.ShmOffset, again.ShmOffset); // the freed run is reused...
        var contents = new byte[again.Size];
        rig.Session.ReadMemory(again.Vaddr, contents);
        Assert.All(contents, b => Assert.Equal(0, b)); // ...zeroed
    }

    /// <summary>
    /// The file's free list against a model: random allocations and frees of shared blocks (seeds
    /// replayable) never give two live blocks overlapping pages of the file, never disturb a live
    /// block's bytes, count exactly the live blocks against the limit, and leave exactly their pages
    /// allocated in /dev/shm. A refusal changes nothing.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public async Task SharedBlocks_RandomAllocateAndFree_MatchTheModel(int seed)
    {
        const ulong limit = 64 * Page;
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0, new SessionOptions { MemoryLimit = limit });
        var random = new Random(seed);
        var live = new List<(MemoryBlock Block, byte Tag)>();
        for (var step = 0; step < 400; step++)
        {
            var used = live.Aggregate(0ul, (sum, b) => sum + b.Block.Size);
            if (live.Count > 0 && random.Next(3) == 0)
            {
                var index = random.Next(live.Count);
                rig.Session.Free(live[index].Block.Vaddr);
                live.RemoveAt(index);
            }
            else
            {
                var size = (ulong)random.Next(1, 9) * Page;
                try
                {
                    var block = rig.Session.Allocate(size, Shm.Uid);
                    var tag = (byte)(step % 251 + 1);
                    var contents = new byte[block.Size];
                    rig.Session.ReadMemory(block.Vaddr, contents);
                    Assert.All(contents, b => Assert.Equal(0, b));
                    Array.Fill(contents, tag);
                    rig.Session.WriteMemory(block.Vaddr, contents);
                    live.Add((block, tag));
                }
                catch (ErrnoException e) when (e.Errno == Errno.ENOMEM)
                {
                    // Over the limit, or (rarely, within it) no free run of the file is large enough.
                    Assert.True(used + size > limit || e.Message.Contains("no free run", StringComparison.Ordinal), $"seed {seed} step {step}: {e.Message}");
                    Assert.Equal(used, rig.Session.Memory.Used);
                }
            }

            Assert.Equal(live.Aggregate(0ul, (sum, b) => sum + b.Block.Size), rig.Session.Memory.Used);
            var byOffset = live.OrderBy(b => b.Block.ShmOffset).ToList();
            for (var i = 1; i < byOffset.Count; i++)
                Assert.True(byOffset[i - 1].Block.ShmOffset + byOffset[i - 1].Block.Size <= byOffset[i].Block.ShmOffset, $"seed {seed} step {step}: two live blocks overlap in the file");
            if (step % 50 == 49 && rig.Session.Memory.SharedPath is { } path)
            {
                foreach (var (block, tag) in live)
                {
                    var contents = new byte[block.Size];
                    rig.Session.ReadMemory(block.Vaddr, contents);
                    Assert.All(contents, b => Assert.Equal(tag, b));
                }
                Assert.Equal(rig.Session.Memory.Used, Shm.AllocatedBytes(path));
            }
        }
    }

    [Fact]
    public async Task Free_MappedSharedBlock_IsEbusyAndKeepsItsPages()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = rig.Session.Allocate(Page, Shm.Uid);
        rig.Session.WriteMemory(block.Vaddr, "kept"u8);
        rig.Map(block.Vaddr, Iova, Page);

        Assert.Equal(Errno.EBUSY, Assert.Throws<ErrnoException>(() => rig.Session.Free(block.Vaddr)).Errno);

        var read = new byte[4];
        Assert.True(rig.Open().DmaRead(Iova, read).Ok);
        Assert.Equal("kept"u8.ToArray(), read);
    }

    [Fact]
    public async Task Limit_CountsSharedAndOwnMemoryTogether_AndARefusalLeavesNoFile()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0, new SessionOptions { MemoryLimit = 8 * Page });

        // The first shared allocation is refused for the limit before any file is made.
        rig.Session.Allocate(5 * Page);
        Assert.Equal(Errno.ENOMEM, Assert.Throws<ErrnoException>(() => rig.Session.Allocate(4 * Page, Shm.Uid)).Errno);
        Assert.Null(rig.Session.Memory.SharedPath);

        var shared = rig.Session.Allocate(3 * Page, Shm.Uid);
        Assert.Equal(8 * Page, rig.Session.Memory.Used);
        Assert.Equal(Errno.ENOMEM, Assert.Throws<ErrnoException>(() => rig.Session.Allocate(1)).Errno);
        Assert.Equal(Errno.ENOMEM, Assert.Throws<ErrnoException>(() => rig.Session.Allocate(1, Shm.Uid)).Errno);
        Assert.Equal(8 * Page, rig.Session.Memory.Used);
        Assert.Equal(2, rig.Session.Memory.BlockCount);
        Assert.True(File.Exists(shared.ShmPath));
    }

    [Theory]
    [InlineData(SessionEndReason.ClientClosed)]
    [InlineData(SessionEndReason.LeaseExpired)]
    [InlineData(SessionEndReason.ConnectionLost)]
    [InlineData(SessionEndReason.Revoked)]
    [InlineData(SessionEndReason.Shutdown)]
    public async Task SessionEnd_AnyReason_UnlinksTheFile(SessionEndReason reason)
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = rig.Session.Allocate(2 * Page, Shm.Uid);
        rig.Map(block.Vaddr, Iova, block.Size);
        Assert.True(File.Exists(block.ShmPath));

        if (reason == SessionEndReason.LeaseExpired)
        {
            rig.Clock.Advance(new SessionOptions().LeaseTtl + TimeSpan.FromSeconds(1));
            await rig.Session.Teardown!.WaitAsync(CoreState.Timeout);
        }
        else if (reason == SessionEndReason.Shutdown)
        {
            await rig.Broker.DisposeAsync().AsTask().WaitAsync(CoreState.Timeout);
        }
        else
        {
            await rig.Broker.Sessions.EndAsync(rig.Session, reason).WaitAsync(CoreState.Timeout);
        }

        Assert.False(File.Exists(block.ShmPath));
        Assert.Null(rig.Session.Memory.SharedPath);
        Assert.Empty(Directory.GetFiles(SharedMemoryFile.Directory, $"{SharedMemoryFile.NamePrefix}{Environment.ProcessId}-s{rig.Session.Id}-*"));
    }

    /// <summary>
    /// §15: the broker stops touching the memory before the session's ownership is released. A
    /// device writes a counter into shared memory as fast as it can while the session ends; once
    /// the end is published (the group is back to DEFAULT), the client's mapping never changes
    /// again, and holds exactly the last write the device was told succeeded.
    /// </summary>
    [Fact]
    [Trait("Category", "RealThreads")]
    public async Task SessionEnd_WhileADeviceWritesSharedMemory_NoWriteLandsAfterTheEndIsPublished()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = rig.Session.Allocate(Page, Shm.Uid);
        rig.Map(block.Vaddr, Iova, Page);
        var device = rig.Open();
        using var client = Shm.MapAsClient(block);
        long lastOk = 0;
        var published = 0;
        var firstWrite = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var writer = Task.Factory.StartNew(() =>
        {
            Span<byte> value = stackalloc byte[8];
            var afterPublished = 0;
            for (long i = 1; afterPublished < 10_000; i++)
            {
                if (Volatile.Read(ref published) != 0)
                    afterPublished++;
                BinaryPrimitives.WriteInt64LittleEndian(value, i);
                try
                {
                    if (device.DmaWrite(Iova, value).Ok)
                    {
                        Volatile.Write(ref lastOk, i);
                        firstWrite.TrySetResult();
                    }
                }
                catch (ErrnoException)
                {
                    // The session is ending or gone: the device is closed.
                }
            }
        }, TaskCreationOptions.LongRunning);
        await firstWrite.Task.WaitAsync(CoreState.Timeout);

        await rig.Broker.Sessions.EndAsync(rig.Session, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);
        Assert.NotEqual(Topology.OwnerKind.User, rig.Broker.Journal.Current.Groups[DmaRig.EduGroups[0]].OwnerKind);
        var atPublish = BinaryPrimitives.ReadInt64LittleEndian(client.Span);
        Volatile.Write(ref published, 1);
        await writer.WaitAsync(CoreState.Timeout);

        Assert.Equal(Volatile.Read(ref lastOk), atPublish);
        Assert.Equal(atPublish, BinaryPrimitives.ReadInt64LittleEndian(client.Span));
        Assert.False(File.Exists(block.ShmPath));
    }
}

/// <summary>The client's side of shared memory in core tests: the file mapped as a client would, and what the filesystem says of it.</summary>
internal static class Shm
{
    /// <summary>This process's uid: the "peer" whose file it is.</summary>
    public static uint Uid { get; } = uint.Parse(File.ReadLines("/proc/self/status").First(l => l.StartsWith("Uid:", StringComparison.Ordinal)).Split('\t', StringSplitOptions.RemoveEmptyEntries)[1], System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>The file's type, owner and octal mode, from stat(1).</summary>
    public static (string Type, uint Owner, string Mode) Stat(string path)
    {
        var fields = Run("stat", "-c", "%F|%u|%a", path).Trim().Split('|');
        return (fields[0], uint.Parse(fields[1], System.Globalization.CultureInfo.InvariantCulture), fields[2]);
    }

    /// <summary>How many bytes of the file have pages behind them (stat's blocks of 512 bytes).</summary>
    public static ulong AllocatedBytes(string path) => ulong.Parse(Run("stat", "-c", "%b", path).Trim(), System.Globalization.CultureInfo.InvariantCulture) * 512;

    /// <summary>Maps the block's range of its file, read/write and shared, as the client library does.</summary>
    public static ClientView MapAsClient(MemoryBlock block)
    {
        var file = MemoryMappedFile.CreateFromFile(new FileStream(block.ShmPath!, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete),
            null, 0, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: false);
        return new ClientView(file, file.CreateViewAccessor((long)block.ShmOffset, (long)block.Size), (int)block.Size);
    }

    private static string Run(string file, params string[] args)
    {
        using var process = System.Diagnostics.Process.Start(new System.Diagnostics.ProcessStartInfo(file, args) { RedirectStandardOutput = true })!;
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        Assert.Equal(0, process.ExitCode);
        return output;
    }

    internal sealed unsafe class ClientView(MemoryMappedFile file, MemoryMappedViewAccessor view, int length) : IDisposable
    {
        public Span<byte> Span
        {
            get
            {
                byte* pointer = null;
                view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
                try
                {
                    return new Span<byte>(pointer + view.PointerOffset, length);
                }
                finally
                {
                    view.SafeMemoryMappedViewHandle.ReleasePointer();
                }
            }
        }

        public void Dispose()
        {
            view.Dispose();
            file.Dispose();
        }
    }
}
