// A ring-style streaming driver written only against DmaBroker.Client: the device receives
// packets into an RX ring (device writes) and transmits from a TX ring (device reads), in
// batches, with every packet checked. Uses the iommufd-style flow: an IOMMUFD container, a
// device bind, and broker-chosen IOVAs.
//   dotnet run --project clients/samples/StreamingDriver -- [--broker URL] [--device 0000:09:00.0]
//       [--packets N (0 = until Ctrl-C)] [--size 64] [--ring 256]
//       [--shared (SPEC §15's local path: the rings are shared memory the driver reads and writes
//        as plain memory; needs a unix:// broker address)]
using System.Buffers.Binary;
using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

var broker = Option("--broker") ?? Environment.GetEnvironmentVariable(BrokerClient.AddressVariable);
var address = Option("--device") ?? "0000:09:00.0";
var packets = long.Parse(Option("--packets") ?? "100000", System.Globalization.CultureInfo.InvariantCulture);
var size = int.Parse(Option("--size") ?? "64", System.Globalization.CultureInfo.InvariantCulture);
var ring = int.Parse(Option("--ring") ?? "256", System.Globalization.CultureInfo.InvariantCulture);
if (size is < 16 or > 65536 || ring is < 1 or > 4096 || packets < 0)
{
    Console.Error.WriteLine("streaming-driver: --size 16..65536, --ring 1..4096, --packets >= 0");
    return 2;
}

var shared = args.Contains("--shared");
if (shared && broker?.StartsWith("unix://", StringComparison.Ordinal) != true)
{
    Console.Error.WriteLine($"streaming-driver: --shared needs a unix:// broker address (--broker unix:///path/to/socket), not '{broker}': the broker shares memory only with clients on its own host");
    return 2;
}

using var stop = new CancellationTokenSource();
Console.CancelKeyPress += (_, e) =>
{
    e.Cancel = true;
    stop.Cancel();
};

try
{
    using var client = BrokerClient.Connect(broker);
    await using var session = await client.OpenSessionAsync("streaming-driver");
    var container = await session.NewContainerAsync(ContainerType.Iommufd);
    await container.BindDeviceAsync(address);
    var ringBytes = (ulong)(ring * size);
    var rx = await session.AllocateAsync(ringBytes, shared);
    var tx = await session.AllocateAsync(ringBytes, shared);
    var rxMap = await container.MapAsync(rx, iova: null, read: false, write: true);   // the device writes RX
    var txMap = await container.MapAsync(tx, iova: null, read: true, write: false);   // the device reads TX
    await using var device = await session.OpenDeviceAsync(address);
    await device.EnableBusMasterAsync();
    await using var dma = await device.OpenDmaChannelAsync();
    Console.WriteLine($"ready: session {session.Id}, {address}, RX ring at IOVA 0x{rxMap.Iova:x}, TX ring at 0x{txMap.Iova:x}, {ring} x {size} bytes{(shared ? " of shared memory" : "")}");

    long sequence = 0;
    var clock = Stopwatch.StartNew();
    var lastReport = TimeSpan.Zero;
    var ended = session.Ended;
    while (!stop.IsCancellationRequested && (packets == 0 || sequence < packets) && !ended.IsCompleted)
    {
        var count = (int)(packets == 0 ? ring : Math.Min(ring, packets - sequence));
        // RX: the device writes a burst of packets into the ring; the driver checks each one.
        var writes = new Task<DmaResult>[count];
        for (var i = 0; i < count; i++)
            writes[i] = dma.WriteAsync(rxMap.Iova + (ulong)(i * size), Packet(sequence + i, size));
        foreach (var w in writes)
            (await w).EnsureOk();
        // Shared memory: the ring itself; otherwise a copy by Memory.Read.
        ReadOnlyMemory<byte> received = shared ? rx.Memory[..(count * size)] : await rx.ReadAsync(0, count * size);
        for (var i = 0; i < count; i++)
            Verify(received.Span.Slice(i * size, size), sequence + i, "RX");

        // TX: the driver fills the ring (in place when shared, else by Memory.Write); the device reads each packet out.
        var outgoing = shared ? tx.Memory[..(count * size)] : new byte[count * size];
        for (var i = 0; i < count; i++)
            Packet(sequence + i, size).CopyTo(outgoing.Span[(i * size)..]);
        if (!shared)
            await tx.WriteAsync(0, outgoing);
        var reads = new Task<DmaResult>[count];
        for (var i = 0; i < count; i++)
            reads[i] = dma.ReadAsync(txMap.Iova + (ulong)(i * size), size);
        for (var i = 0; i < count; i++)
            Verify((await reads[i]).EnsureOk().Data.Span, sequence + i, "TX");

        sequence += count;
        if (clock.Elapsed - lastReport >= TimeSpan.FromSeconds(1))
        {
            lastReport = clock.Elapsed;
            Console.WriteLine($"{sequence} packets each way, {sequence / clock.Elapsed.TotalSeconds:F0} packets/s");
        }
    }
    if (ended.IsCompleted)
    {
        Console.Error.WriteLine($"streaming-driver: session ended: {await ended}");
        return 1;
    }
    Console.WriteLine($"done: {sequence} packets of {size} bytes each way in {clock.Elapsed.TotalSeconds:F2} s ({sequence / clock.Elapsed.TotalSeconds:F0} packets/s), data intact{(shared ? ", through shared memory" : "")}");
    return 0;
}
catch (BrokerException e)
{
    Console.Error.WriteLine($"streaming-driver: {e.Reason}: {e.Message}");
    return e is BrokerUnavailableException ? 3 : 1;
}
catch (DmaFaultException e)
{
    Console.Error.WriteLine($"streaming-driver: {e.Message}");
    return 1;
}
catch (InvalidDataException e)
{
    Console.Error.WriteLine($"streaming-driver: DATA CORRUPTION: {e.Message}");
    return 4;
}

// A packet: its sequence number, then bytes derived from it.
static byte[] Packet(long sequence, int size)
{
    var packet = new byte[size];
    BinaryPrimitives.WriteInt64LittleEndian(packet, sequence);
    for (var i = 8; i < size; i++)
        packet[i] = (byte)(sequence * 131 + i);
    return packet;
}

static void Verify(ReadOnlySpan<byte> packet, long sequence, string direction)
{
    if (!packet.SequenceEqual(Packet(sequence, packet.Length)))
        throw new InvalidDataException($"{direction} packet {sequence} differs from what was sent (first bytes {Convert.ToHexString(packet[..8])})");
}

string? Option(string name)
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
}
