namespace DmaBroker.Core.Iommu;

/// <summary>
/// Produces a device write's bytes straight into host memory (<see cref="IovaSpace.DeviceFill{TState}"/>):
/// <paramref name="destination"/> is the part of the access that starts <paramref name="at"/> bytes into it.
/// </summary>
internal delegate void DmaFill<in TState>(Span<byte> destination, int at, TState state);
